"""Tests for baselines.py: Muon, SOAP, Shampoo and make_optimizer.

Exactness checks run in float64 against references written here from the
papers' formulas; training checks use the tiny GPT on bytes of Python's own
documentation (pydoc_data.topics).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from pydoc_data.topics import topics

from baselines import DEFAULT_LR, SOAP, Muon, Shampoo, make_optimizer, newton_schulz, split_muon_params
from model import GPT, PRESETS

NAMES = ["adamw", "muon", "soap", "shampoo"]
OURS = ["muon", "soap", "shampoo"]
TEXT = torch.frombuffer(bytearray("\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.uint8).long()


def batch(generator, batch_size=8, seq_len=32):
    start = torch.randint(len(TEXT) - seq_len - 1, (batch_size,), generator=generator)
    window = torch.stack([TEXT[s:s + seq_len + 1] for s in start.tolist()])
    return window[:, :-1], window[:, 1:]


def loss_of(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


def tiny_gpt(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return GPT(PRESETS["tiny"]).to(dtype)


# --- Newton-Schulz ----------------------------------------------------------

QUINTIC = (3.4445, -4.7750, 2.0315)


def well_conditioned(shape, gen):
    """Wide or tall Gaussian matrices are well conditioned; a square one is
    not, so square ones get singular values spread evenly over [0.05, 1]."""
    if shape[0] != shape[1]:
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    U, V = (torch.linalg.qr(torch.randn(shape, generator=gen, dtype=torch.float64)).Q for _ in range(2))
    return U @ torch.diag(torch.linspace(0.05, 1, shape[0], dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48)])
def test_newton_schulz_maps_singular_values_by_the_quintic(shape):
    G = well_conditioned(shape, torch.Generator().manual_seed(1))
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    X = newton_schulz(G)

    # The iteration is an odd matrix polynomial: it keeps U and V and applies
    # p(s) = a s + b s³ + c s⁵ five times to the Frobenius-normalized spectrum
    # (normalized with newton_schulz's default eps = 1e-7 added to the norm).
    s = S / (G.norm() + 1e-7)
    a, b, c = QUINTIC
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    torch.testing.assert_close(X, U @ torch.diag(s) @ Vh, rtol=1e-6, atol=1e-9)

    # Iterating p five times maps every s in [0.003, 1] into [0.68, 1.21] (checked
    # on a fine grid when writing this); these inputs have s_min / ‖G‖_F
    # well above 0.003.
    assert (S.min() / G.norm()).item() > 0.003
    sv = torch.linalg.svdvals(X)
    assert sv.min() > 0.68 and sv.max() < 1.21, sv
    # So X is U Vᵀ up to that spread: relative Frobenius error at most
    # max |s − 1| = 0.32 over the band (measured about 0.22).
    UVt = U @ Vh
    assert (X - UVt).norm() / UVt.norm() < 0.32


# --- SOAP ---------------------------------------------------------------------


def test_soap_equals_adam_in_the_exact_eigenbasis():
    """SOAP with an eigh refresh every step, against Adam written out in the
    eigenbasis of the factors (the SOAP paper's Algorithm, with the reference
    code's first step that only measures the gradient)."""
    lr, (beta1, beta2), shampoo_beta, eps, wd = 0.1, (0.9, 0.99), 0.8, 1e-8, 0.1
    gen = torch.Generator().manual_seed(0)
    # "wide": both sides preconditioned; "long": its 9-side exceeds
    # max_precond_dim=5 and keeps the identity; "gain": 1-D, plain Adam.
    shapes = {"wide": (3, 4), "long": (3, 9), "gain": (5,)}
    params = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    opt = SOAP(list(params.values()), lr=lr, betas=(beta1, beta2), shampoo_beta=shampoo_beta, eps=eps,
               weight_decay=wd, precondition_frequency=1, max_precond_dim=5, exact_eigh=True)

    def eigenbasis(M):  # eigenvectors by decreasing eigenvalue, or identity past max_precond_dim
        return torch.eye(len(M), dtype=M.dtype) if len(M) > 5 else torch.linalg.eigh(M).eigenvectors.flip(-1)

    ref = {}
    for n, p in params.items():
        G0 = torch.zeros_like(p) if p.ndim == 2 else torch.zeros_like(p)[:, None]  # 1-D as a column
        ref[n] = dict(W=p.clone(), M=torch.zeros_like(G0), V=torch.zeros_like(G0),
                      L=torch.zeros(len(G0), len(G0), dtype=p.dtype),
                      R=torch.zeros(G0.shape[1], G0.shape[1], dtype=p.dtype))

    for k in range(8):
        grads = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()

        for n, r in ref.items():
            G = grads[n] if grads[n].ndim == 2 else grads[n][:, None]
            if k > 0:  # the first step moves nothing
                if grads[n].ndim == 2:
                    QL, QR = r["QL"], r["QR"]
                else:
                    QL, QR = torch.eye(len(G), dtype=G.dtype), torch.eye(1, dtype=G.dtype)
                r["M"] = beta1 * r["M"] + (1 - beta1) * G
                r["V"] = beta2 * r["V"] + (1 - beta2) * (QL.T @ G @ QR) ** 2
                m_hat, v_hat = r["M"] / (1 - beta1**k), r["V"] / (1 - beta2**k)
                N = QL @ ((QL.T @ m_hat @ QR) / (v_hat.sqrt() + eps)) @ QR.T
                r["W"] = r["W"] * (1 - lr * wd) - lr * N.reshape(r["W"].shape)
            r["L"] = shampoo_beta * r["L"] + (1 - shampoo_beta) * G @ G.T
            r["R"] = shampoo_beta * r["R"] + (1 - shampoo_beta) * G.T @ G
            r["QL"], r["QR"] = eigenbasis(r["L"]), eigenbasis(r["R"])
            torch.testing.assert_close(params[n], r["W"], rtol=1e-9, atol=1e-11, msg=f"{n}, step {k}")
    assert not torch.equal(params["wide"], ref["wide"]["W"].new_zeros(3, 4))


# --- Shampoo --------------------------------------------------------------------


def reference_inverse_root(M, power, eps_root):
    """M^power with eps_root·λ_max added to every eigenvalue, by eigh."""
    lam, Q = torch.linalg.eigh(M)
    return Q @ torch.diag((lam + eps_root * lam.max()) ** power) @ Q.T


@pytest.mark.parametrize("one_sided", [False, True])
def test_shampoo_direction_and_adam_grafted_norm(one_sided):
    """With beta1 = 0 (no momentum) every step is L^(-1/4) G R^(-1/4), computed
    here with eigh, rescaled to the norm of Adam's G / (√v̂ + eps). With the
    6-side above max_precond_dim it is L^(-1/2) G."""
    lr, beta2, eps, factor_beta, eps_root = 0.5, 0.95, 1e-8, 0.9, 1e-6
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    opt = Shampoo([W], lr=lr, betas=(0.0, beta2), eps=eps, factor_beta=factor_beta, update_freq=1,
                  eps_root=eps_root, max_precond_dim=5 if one_sided else 10000)
    power = -0.5 if one_sided else -0.25

    def inverse_root(M):
        return reference_inverse_root(M, power, eps_root)

    L, R, V = torch.zeros(4, 4, dtype=W.dtype), torch.zeros(6, 6, dtype=W.dtype), torch.zeros_like(W)
    for t in range(1, 5):
        G = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        W.grad = G.clone()
        before = W.clone()
        opt.step()
        step = (before - W) / lr

        L, R = factor_beta * L + G @ G.T, factor_beta * R + G.T @ G
        V = beta2 * V + (1 - beta2) * G**2
        direction = inverse_root(L) @ G if one_sided else inverse_root(L) @ G @ inverse_root(R)
        adam = G / ((V / (1 - beta2**t)).sqrt() + eps)
        torch.testing.assert_close(step / step.norm(), direction / direction.norm(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(step.norm(), adam.norm(), rtol=1e-9, atol=0)
        # ... and it is not just Adam's step: the preconditioner matters here.
        assert (step - adam).norm() > 0.1 * adam.norm()


def test_shampoo_takes_adam_steps_until_its_first_roots_then_refreshes_them_on_schedule():
    """start_preconditioning_step defaults to update_freq (3 here): steps 1 and 2 are Adam's
    G / (√v̂ + eps) while the factors accumulate; step 3 takes its roots from all three
    gradients, steps 4 and 5 keep them, step 6 takes new ones."""
    beta2, eps, eps_root = 0.95, 1e-8, 1e-6
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    opt = Shampoo([W], lr=1.0, betas=(0.0, beta2), eps=eps, update_freq=3, eps_root=eps_root)
    L, R, V = torch.zeros(4, 4, dtype=W.dtype), torch.zeros(6, 6, dtype=W.dtype), torch.zeros_like(W)
    for t in range(1, 7):
        G = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        W.grad = G.clone()
        before = W.clone()
        opt.step()
        step = before - W
        L, R, V = L + G @ G.T, R + G.T @ G, beta2 * V + (1 - beta2) * G**2
        adam = G / ((V / (1 - beta2**t)).sqrt() + eps)
        if t in (3, 6):
            roots = reference_inverse_root(L, -0.25, eps_root), reference_inverse_root(R, -0.25, eps_root)
        if t < 3:
            torch.testing.assert_close(step, adam, rtol=1e-10, atol=1e-12)
        else:
            direction = roots[0] @ G @ roots[1]
            torch.testing.assert_close(step, direction * adam.norm() / direction.norm(), rtol=1e-9, atol=1e-11)


# --- Muon ------------------------------------------------------------------------


def test_muon_steps_match_their_formulas():
    """Muon group: Nesterov momentum, then newton_schulz (checked above) one matrix at a time,
    scaled by max(1, rows/cols)^0.5, decoupled decay; two of the matrices share a shape, so the
    optimizer orthogonalizes them in one batch. AdamW group: torch.optim.AdamW."""
    lr, momentum, wd, adamw_lr, betas = 0.05, 0.9, 0.1, 0.01, (0.8, 0.9)
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 4), (4, 8), (8, 4)]
    Ws = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    gain = torch.randn(4, generator=gen, dtype=torch.float64)
    opt = Muon([dict(params=Ws), dict(params=[gain], use_muon=False, lr=adamw_lr)],
               lr=lr, momentum=momentum, weight_decay=wd, betas=betas, eps=1e-8)
    W_refs, gain_ref = [W.clone() for W in Ws], gain.clone().requires_grad_()
    adamw = torch.optim.AdamW([gain_ref], lr=adamw_lr, betas=betas, eps=1e-8, weight_decay=wd)
    bufs = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for _ in range(4):
        g = torch.randn(4, generator=gen, dtype=torch.float64)
        for W in Ws:
            W.grad = torch.randn(W.shape, generator=gen, dtype=torch.float64)
        gain.grad, gain_ref.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
        for i, W in enumerate(Ws):
            bufs[i] = momentum * bufs[i] + (1 - momentum) * W.grad
            nesterov = (1 - momentum) * W.grad + momentum * bufs[i]
            scale = max(1, W.shape[0] / W.shape[1]) ** 0.5
            W_refs[i] = W_refs[i] * (1 - lr * wd) - lr * scale * newton_schulz(nesterov)
            torch.testing.assert_close(W, W_refs[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gain, gain_ref.detach(), rtol=1e-10, atol=1e-12)


# --- all optimizers ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_lowers_a_convex_quadratic(name):
    """½‖X W + b − Y‖² / n with W a matrix (Muon's part) and b a vector (AdamW's)."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 12, generator=gen), torch.randn(64, 8, generator=gen)
    W, b = torch.zeros(12, 8, requires_grad=True), torch.zeros(8, requires_grad=True)
    opt = make_optimizer(name, [("w", W), ("b", b)], lr=0.02, precondition_frequency=5) if name == "soap" \
        else make_optimizer(name, [("w", W), ("b", b)], lr=0.02)

    def loss():
        return 0.5 * (X @ W + b - Y).square().sum(1).mean()

    start = loss().item()
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    # The least-squares optimum is the floor; the optimizer must close most of the gap.
    Xb = torch.cat([X, torch.ones(64, 1)], 1)
    optimum = 0.5 * (Xb @ torch.linalg.lstsq(Xb, Y).solution - Y).square().sum(1).mean().item()
    assert loss().item() - optimum < 0.25 * (start - optimum), (start, loss().item(), optimum)


@pytest.mark.parametrize("name", NAMES)
def test_lowers_the_tiny_models_loss(name):
    model = tiny_gpt()
    opt = make_optimizer(name, list(model.named_parameters()), DEFAULT_LR[name])
    gen = torch.Generator().manual_seed(0)
    held_out = batch(torch.Generator().manual_seed(123), batch_size=32)
    with torch.no_grad():
        start = loss_of(model, *held_out).item()
    train(model, opt, [batch(gen) for _ in range(30)])
    with torch.no_grad():
        end = loss_of(model, *held_out).item()
    # From ln 256 = 5.55 (uniform guessing) to below 3.7 on held-out windows, a
    # drop of 1.85 nats in 30 steps (measured: 2.8 to 3.4). The byte unigram
    # entropy of this text is 3.26 nats, so this checks descent, not modelling.
    assert abs(start - 5.55) < 0.05
    assert end < 3.7, (start, end)


@pytest.mark.parametrize("name", OURS)
def test_state_dict_round_trip_continues_bitwise(name):
    kwargs = {"soap": dict(precondition_frequency=2), "shampoo": dict(update_freq=2)}.get(name, {})
    gen = torch.Generator().manual_seed(0)
    batches = [batch(gen, batch_size=4, seq_len=16) for _ in range(8)]

    model = tiny_gpt()
    opt = make_optimizer(name, list(model.named_parameters()), DEFAULT_LR[name], weight_decay=0.1, **kwargs)
    train(model, opt, batches[:3])  # past SOAP's and Shampoo's first refresh
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, batches[3:])

    resumed = tiny_gpt(seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = make_optimizer(name, list(resumed.named_parameters()), 1.0, **kwargs)  # lr etc. come from the state
    resumed_opt.load_state_dict(saved_opt)
    train(resumed, resumed_opt, batches[3:])

    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", OURS)
def test_bfloat16_params_keep_float32_state(name):
    model = tiny_gpt(dtype=torch.bfloat16)
    opt = make_optimizer(name, list(model.named_parameters()), DEFAULT_LR[name])
    gen = torch.Generator().manual_seed(0)
    before = [p.clone() for p in model.parameters()]
    train(model, opt, [batch(gen) for _ in range(2)])  # SOAP moves from its second step on
    for b, p in zip(before, model.parameters()):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

    def state_tensors(o):
        for state in o.state.values():
            for value in state.values():
                yield from (value if isinstance(value, list) else [value])

    assert all(t.dtype == torch.float32 for t in state_tensors(opt) if isinstance(t, torch.Tensor))
    # torch.optim.Optimizer.load_state_dict would cast the state to bfloat16.
    reloaded = make_optimizer(name, list(model.named_parameters()), DEFAULT_LR[name])
    reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(t.dtype == torch.float32 for t in state_tensors(reloaded) if isinstance(t, torch.Tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", OURS)
def test_cuda_matches_cpu(name):
    gen = torch.Generator().manual_seed(0)
    batches = [batch(gen) for _ in range(3)]
    results = []
    for device in ["cpu", "cuda"]:
        model = tiny_gpt().to(device)
        opt = make_optimizer(name, list(model.named_parameters()), DEFAULT_LR[name])
        train(model, opt, [(x.to(device), y.to(device)) for x, y in batches])
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


# --- construction -------------------------------------------------------------------


def test_split_muon_params_on_the_tiny_gpt():
    named = list(tiny_gpt().named_parameters())
    muon, adamw = split_muon_params(named)
    muon_names, adamw_names = [n for n, _ in muon], [n for n, _ in adamw]
    assert sorted(muon_names + adamw_names) == sorted(n for n, _ in named)  # each exactly once
    assert len(set(muon_names + adamw_names)) == len(named)
    assert "blocks.0.attn.qkv.weight" in muon_names and "blocks.2.mlp.down.weight" in muon_names
    assert {"embed.weight", "head.weight", "norm.weight", "blocks.0.attn_norm.weight"} <= set(adamw_names)
    assert all(t.ndim == 2 for _, t in muon) and all("norm" not in n for n in muon_names)
    assert len(muon_names) == 3 * 5  # qkv, proj, gate, up, down in each of 3 blocks


def test_muon_works_on_plain_leaf_tensors_and_rejects_non_matrices():
    deltas = [("blocks.0.mlp.up.weight", torch.zeros(8, 4)), ("norm.weight", torch.zeros(4))]
    opt = make_optimizer("muon", deltas, lr=0.1)
    for _, d in deltas:
        d.grad = torch.ones_like(d)
    opt.step()
    assert all(d.abs().sum() > 0 for _, d in deltas)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.zeros(4)])


def test_make_optimizer_types_and_unknown_name():
    named = list(tiny_gpt().named_parameters())
    expected = {"adamw": torch.optim.AdamW, "muon": Muon, "soap": SOAP, "shampoo": Shampoo}
    for name, cls in expected.items():
        assert type(make_optimizer(name, named, DEFAULT_LR[name])) is cls
    assert set(DEFAULT_LR) == set(expected)
    with pytest.raises(ValueError, match="adamw, muon, soap, shampoo"):
        make_optimizer("sgd", named, 0.1)


def test_muon_weight_decay_applies_to_the_hidden_matrices_and_weight_decay_to_the_adamw_groups():
    """With zero gradients a step is decay alone: p ← (1 − lr·wd)·p."""
    named = [("blocks.0.mlp.up.weight", torch.ones(8, 4)), ("embed.weight", torch.ones(5, 4)),
             ("norm.weight", torch.ones(4))]
    opt = make_optimizer("muon", named, lr=0.1, weight_decay=0.5, muon_weight_decay=0.0, adamw_lr=0.2)
    for _, t in named:
        t.grad = torch.zeros_like(t)
    opt.step()
    assert [t.unique().item() for _, t in named] == pytest.approx([1.0, 0.9, 0.9])
