"""Tests of baselines.py against independent references: the SVD, Adam written
out in an eigh eigenbasis, inverse roots from eigh, and plain descent checks."""
import copy

import pydoc_data.topics
import pytest
import torch
import torch.nn.functional as F

from baselines import SOAP, Shampoo, make_optimizer, newton_schulz, split_muon_params
from model import GPT, PRESETS


@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_newton_schulz_orthogonalizes_within_its_band(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape, dtype=torch.float64)
    X = newton_schulz(G)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    # The iteration is an odd polynomial in G, so X = U p(S) Vᵀ: same singular vectors...
    core = U.T @ X @ Vh.T
    off_diagonal = core - torch.diag(torch.diag(core))
    assert off_diagonal.abs().max() < 1e-9
    # ...and singular values pulled into the band the quintic is tuned for (about 0.7 to 1.2).
    s = torch.diag(core)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # Hence close to U Vᵀ, the exact orthogonalization.
    assert (X - U @ Vh).norm() / (U @ Vh).norm() < 0.3


def test_soap_equals_adam_in_the_exact_eigenbasis():
    torch.manual_seed(1)
    # Square, so that G Gᵀ and Gᵀ G have full rank from the first step: a null
    # space would leave the eigenbasis, and so the comparison, undetermined.
    W = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    grads = [torch.randn(4, 4, dtype=torch.float64) for _ in range(6)]
    lr, (b1, b2), beta, eps, wd = 0.1, (0.9, 0.95), 0.8, 1e-8, 0.01
    opt = SOAP([W], lr=lr, betas=(b1, b2), shampoo_beta=beta, eps=eps, weight_decay=wd,
               precondition_frequency=1, exact_eigh=True)

    def eigenbasis(M):
        return torch.linalg.eigh(M).eigenvectors

    w = W.detach().clone()
    L, R = torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)
    m, v = torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)
    QL = QR = None
    for t, G in enumerate(grads):
        W.grad = G.clone()
        opt.step()
        if t > 0:  # SOAP's first step only builds the first eigenbasis
            m = b1 * m + (1 - b1) * G
            v = b2 * v + (1 - b2) * (QL.T @ G @ QR) ** 2
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            w = w * (1 - lr * wd) - lr * QL @ ((QL.T @ m_hat @ QR) / (v_hat.sqrt() + eps)) @ QR.T
        L = beta * L + (1 - beta) * G @ G.T
        R = beta * R + (1 - beta) * G.T @ G
        QL, QR = eigenbasis(L), eigenbasis(R)
        torch.testing.assert_close(W.detach(), w, rtol=1e-10, atol=1e-12)


def test_shampoo_direction_and_adam_grafted_norm():
    torch.manual_seed(2)
    W = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    grads = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    lr, b2, eps, eps_root = 0.05, 0.99, 1e-8, 1e-6
    opt = Shampoo([W], lr=lr, betas=(0.0, b2), eps=eps, update_freq=1, eps_root=eps_root)

    def inverse_fourth_root(M):
        lam, Q = torch.linalg.eigh(M)
        return Q @ torch.diag((lam.clamp(min=0) + eps_root * lam.max()) ** -0.25) @ Q.T

    L, R = torch.zeros(6, 6, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)
    v = torch.zeros(6, 4, dtype=torch.float64)
    for t, G in enumerate(grads, start=1):
        before = W.detach().clone()
        W.grad = G.clone()
        opt.step()
        L, R = L + G @ G.T, R + G.T @ G
        v = b2 * v + (1 - b2) * G ** 2
        adam_step = G / ((v / (1 - b2 ** t)).sqrt() + eps)
        direction = inverse_fourth_root(L) @ G @ inverse_fourth_root(R)
        step = (before - W.detach()) / lr  # no momentum (beta1 = 0), no weight decay
        torch.testing.assert_close(step.norm(), adam_step.norm(), rtol=1e-10, atol=0)
        torch.testing.assert_close(step, direction * adam_step.norm() / direction.norm(), rtol=1e-8, atol=1e-12)


OPTIMIZERS = ["adamw", "muon", "soap", "shampoo"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_lowers_a_convex_quadratic(name):
    torch.manual_seed(3)
    A = torch.randn(20, 8)
    B = torch.randn(20, 6)
    W = torch.zeros(8, 6, requires_grad=True)
    opt = make_optimizer(name, [("hidden.weight", W)], lr=0.02)
    best = torch.linalg.lstsq(A, B).solution

    def loss():
        return 0.5 * (A @ W - B).square().mean()
    start, optimum = loss().item(), 0.5 * (A @ best - B).square().mean().item()
    for _ in range(150):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() - optimum < 0.1 * (start - optimum)


def byte_batch(generator, batch=8, seq=32):
    text = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).encode()
    data = torch.tensor(list(text[:200_000]), dtype=torch.long)
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
    x = torch.stack([data[s:s + seq] for s in starts])
    y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
    return x, y


def train_steps(model, opt, generator, n):
    losses = []
    for _ in range(n):
        x, y = byte_batch(generator)
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def build(name, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = GPT(PRESETS["tiny"]).to(dtype)
    extra = {"soap": dict(precondition_frequency=2), "shampoo": dict(update_freq=2)}.get(name, {})
    return model, make_optimizer(name, list(model.named_parameters()), lr={"muon": 0.02}.get(name, 3e-3), **extra)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_lowers_the_tiny_models_loss(name):
    model, opt = build(name)
    losses = train_steps(model, opt, torch.Generator().manual_seed(0), 30)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


@pytest.mark.parametrize("name", ["muon", "soap", "shampoo"])
def test_state_dict_round_trip_continues_bitwise(name):
    model, opt = build(name)
    generator = torch.Generator().manual_seed(0)
    train_steps(model, opt, generator, 3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), generator.get_state()))
    train_steps(model, opt, generator, 3)

    resumed, resumed_opt = build(name, seed=7)
    resumed.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    train_steps(resumed, resumed_opt, torch.Generator().set_state(saved[2]), 3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bfloat16_parameters_step_and_stay_finite(name):
    model, opt = build(name, dtype=torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, torch.Generator().manual_seed(0), 2)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_split_muon_params_on_the_tiny_model():
    model = GPT(PRESETS["tiny"])
    muon, adamw = split_muon_params(model.named_parameters())
    muon_names, adamw_names = {n for n, _ in muon}, {n for n, _ in adamw}
    assert not muon_names & adamw_names
    assert muon_names | adamw_names == {n for n, _ in model.named_parameters()}
    assert {"embed.weight", "head.weight", "norm.weight"} <= adamw_names
    assert all(t.ndim == 2 for _, t in muon) and "blocks.0.attn.qkv.weight" in muon_names
    assert all(t.ndim == 1 for n, t in adamw if n not in ("embed.weight", "head.weight"))


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", [], lr=0.1)
