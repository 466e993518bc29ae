"""Tests of model.py and gn.py against independent references:
explicit Jacobians and loss Hessians, torch's own Hessian-vector products,
finite differences, closed-form least squares and a float64 L-BFGS optimum."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call

import model as model_module
from gn import (COMBINES, CrossEntropy, GaussNewton, MeanSquaredError, directional_model, gn_matvec, line_search,
                load_jvp_decompositions, model_gradient, model_step_size, next_reach, span_model, span_step_sizes,
                step_size_grid)
from model import (GPT, GPTConfig, PAPER_ARCH, PRESETS, CausalAttentionFunction, GELUFunction, LayerNormFunction,
                   LinearFunction, RMSNormFunction, RotaryFunction, SwiGLUFunction, rotary_tables)

load_jvp_decompositions()  # the tests below make duals themselves: without torch's jit warning, as gn.py does


ARCHS = {"llama": {}, "paper": PAPER_ARCH}


def tiny_transformer(seed=0, arch="llama", attention_backward="auto"):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, mlp_hidden=12,
                         attention_backward=attention_backward, **ARCHS[arch])).double()


def small_mlp(out_dim, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out_dim)).double()


class Flat:
    """Parameters as one flat vector and back, to build explicit matrices."""

    def __init__(self, params):
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        self.vector = torch.cat([params[n].reshape(-1) for n in self.names])

    def dict(self, vector):
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            out[n] = vector[i:i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def cat(self, d):
        return torch.cat([d[n].reshape(-1) for n in self.names])


def explicit_pieces(model, x, targets, loss):
    """f, params, the explicit Jacobian J, output gradient g and loss Hessian H."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = lambda p: functional_call(model, p, (x,))
    flat = Flat(params)
    J = torch.autograd.functional.jacobian(lambda v: f(flat.dict(v)), flat.vector).reshape(-1, flat.vector.numel())
    z = f(params)
    loss_of = (lambda zz: F.cross_entropy(zz.reshape(z.shape).flatten(0, -2), targets.flatten())) if loss == "ce" \
        else (lambda zz: F.mse_loss(zz.reshape(z.shape), targets))
    z_flat = z.detach().reshape(-1)
    H = torch.autograd.functional.hessian(loss_of, z_flat)
    g = torch.autograd.functional.jacobian(loss_of, z_flat)
    return f, params, flat, J, g, H, loss_of


def cases():
    torch.manual_seed(1)
    mlp_x = torch.randn(7, 4, dtype=torch.float64)
    tok = torch.randint(0, 11, (2, 5))
    return [
        ("mlp-ce", small_mlp(3), mlp_x, torch.randint(0, 3, (7,)), "ce"),
        ("mlp-mse", small_mlp(2), mlp_x, torch.randn(7, 2, dtype=torch.float64), "mse"),
        ("gpt-ce", tiny_transformer(), tok, torch.randint(0, 11, (2, 5)), "ce"),
        ("gpt-mse", tiny_transformer(), tok, torch.randn(2, 5, 11, dtype=torch.float64), "mse"),
        ("gpt-ce-padded", tiny_transformer(), tok, torch.tensor([[3, 1, -100, 4, -100], [-100, 9, 2, 6, 5]]), "ce"),
    ]


# --- model.py ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_model_jvp_matches_central_differences(arch):
    model = tiny_transformer(arch=arch)
    x = torch.randint(0, 11, (2, 6))
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    f = lambda p: functional_call(model, p, (x,))
    _, jv = torch.func.jvp(f, (params,), (tangent,))

    def central_difference(eps):
        plus = f({k: params[k] + eps * tangent[k] for k in params})
        minus = f({k: params[k] - eps * tangent[k] for k in params})
        return (plus - minus) / (2 * eps)
    # The central difference's error shrinks as eps²: by 100x per 10x smaller eps.
    errors = [(central_difference(eps) - jv).abs().max().item() for eps in (1e-4, 1e-5, 1e-6)]
    assert errors[2] < 1e-6 * jv.abs().max().item()
    assert 50 < errors[0] / errors[1] < 200 and 50 < errors[1] / errors[2] < 200, errors


def test_plain_attention_equals_sdpa_forward():
    model = tiny_transformer()
    x = torch.randint(0, 11, (3, 7))
    params = {k: v.detach() for k, v in model.named_parameters()}
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    z_plain, _ = torch.func.jvp(lambda p: functional_call(model, p, (x,)), (params,), (zero,))
    torch.testing.assert_close(z_plain, model(x), rtol=1e-12, atol=1e-12)


def kernel_cases():
    """(name, function of the differentiable inputs, their shapes, its value by other means)."""
    cos, sin = (t.double() for t in rotary_tables(4, 5, 10000.0))

    def rotary_reference(x):  # the same rotation as a complex product (x1 + i x2) e^{iθ}
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.complex(x1, x2) * torch.complex(cos, sin)
        return torch.cat((rotated.real, rotated.imag), dim=-1)

    return [
        ("linear", LinearFunction.apply, [(2, 3, 4), (5, 4)], F.linear),
        ("rms_norm", lambda x, w: RMSNormFunction.apply(x, w, 1e-6)[0], [(2, 3, 4), (4,)],
         lambda x, w: F.rms_norm(x, (4,), w, 1e-6)),
        ("layer_norm", lambda x, w, b: LayerNormFunction.apply(x, w, b, 1e-6)[0], [(2, 3, 4), (4,), (4,)],
         lambda x, w, b: F.layer_norm(x, (4,), w, b, 1e-6)),
        ("rotary", lambda x: RotaryFunction.apply(x, cos, sin), [(2, 3, 5, 4)], rotary_reference),
        ("swiglu", SwiGLUFunction.apply, [(2, 3, 4), (2, 3, 4)], lambda a, b: F.silu(a) * b),
        ("gelu", GELUFunction.apply, [(2, 3, 4)], lambda a: F.gelu(a, approximate="tanh")),
    ] + [(name, lambda q, k, v, reuse=reuse: CausalAttentionFunction.apply(q, k, v, reuse)[0], [(2, 2, 5, 3)] * 3,
          lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
         for name, reuse in (("attention", True), ("attention_sdpa", False))]


@pytest.mark.parametrize("case", kernel_cases(), ids=lambda c: c[0])
def test_kernels_match_torch_and_finite_differences(case):
    """Each hand-written kernel: its value and vjp against torch's own op, its jvp and
    vjp against finite differences, with every subset of inputs carrying a tangent.
    Attention's backward both ways: reusing P (the CPU's default) or SDPA recomputing (CUDA's)."""
    name, fn, shapes, reference = case
    torch.manual_seed(0)
    inputs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    expected = reference(*inputs)
    torch.testing.assert_close(fn(*inputs), expected)
    leaves = [x.clone().requires_grad_() for x in inputs]
    cotangent = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(fn(*leaves), leaves, cotangent),
                               torch.autograd.grad(reference(*leaves), leaves, cotangent))
    for mask in range(1, 2 ** len(inputs)):
        live = [i for i in range(len(inputs)) if mask >> i & 1]

        def partial(*xs):
            full = list(inputs)
            for i, x in zip(live, xs):
                full[i] = x
            return fn(*full)
        assert torch.autograd.gradcheck(partial, [inputs[i].clone().requires_grad_() for i in live],
                                        check_forward_ad=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_gn_tangent_carries_no_graph(arch):
    """The tangent out of the model has no autograd history: nothing of the
    tangent computation is kept for a backward pass that GN never takes."""
    model = tiny_transformer(arch=arch)
    x = torch.randint(0, 11, (2, 6))
    primals = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    with torch.autograd.forward_ad.dual_level():
        dual = {k: torch.autograd.forward_ad.make_dual(p, torch.randn_like(p)) for k, p in primals.items()}
        z, jz = torch.autograd.forward_ad.unpack_dual(functional_call(model, dual, (x,)))
    assert z.grad_fn is not None and jz.grad_fn is None


@pytest.mark.parametrize("preset", ["tiny", "paper45m"])
def test_gn_blocks_cover_every_parameter_once(preset):
    with torch.device("meta"):
        model = GPT(PRESETS[preset])
    names = [n for _, block in model.gn_blocks() for n in block]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in model.named_parameters()}
    layers = [f"block{i}" for i in range(model.config.n_layer)]
    assert [b for b, _ in model.gn_blocks()] == ["embed", *layers, "head"]
    assert "norm.weight" in dict(model.gn_blocks())[layers[-1]]


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_from_cached_block_inputs_equals_full_forward(arch):
    model = tiny_transformer(arch=arch)
    x = torch.randint(0, 11, (2, 6))
    full = model(x)
    inputs = model.block_inputs(x)
    assert len(inputs) == len(model.gn_blocks())
    for i, h in enumerate(inputs):
        torch.testing.assert_close(model(h, start_block=i), full, rtol=0, atol=1e-13)


def test_presets_build_with_their_sizes():
    for name, millions in [("tiny", 0.38), ("45m", 45.4), ("150m", 148.3)]:
        with torch.device("meta"):
            assert abs(GPT(PRESETS[name]).num_params() / 1e6 - millions) < 0.1
    # The authors' counts, 45,363,712 and 134,142,720: untied embedding and head
    # (vocabulary 32000), per layer q, k, v, out and two 4x-wide MLP matrices
    # (12 d²), two RMSNorm weights and the q and k LayerNorms' weights and
    # biases (6 d), a final RMSNorm.
    for name, d, layers in [("paper45m", 512, 4), ("paper150m", 768, 12)]:
        with torch.device("meta"):
            assert GPT(PRESETS[name]).num_params() == 2 * 32000 * d + layers * (12 * d * d + 6 * d) + d


def test_fan_in_init_draws_the_authors_scales():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, n_layer=1, n_embd=256, mlp_hidden=1024, **PAPER_ARCH))
    for name, p in model.named_parameters():
        if p.ndim == 2:
            std = 1.0 if name == "embed.weight" else p.shape[1] ** -0.5
            assert abs(p.std().item() / std - 1) < 0.02, name


def test_config_rejects_unknown_options():
    for bad in [dict(mlp="relu"), dict(qkv="grouped"), dict(init="xavier"),
                dict(qk_norm=True)]:  # qk_norm needs separate q and k
        with pytest.raises(ValueError):
            GPTConfig(**bad)
    with pytest.raises(ValueError, match="attention_backward 'cuda': one of auto, reuse, recompute"):
        GPTConfig(attention_backward="cuda")


def plain_attention(q, k, v):
    """Causal softmax attention written out, for torch's autograd to differentiate."""
    T = q.shape[-2]
    S = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return S.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_backward_reuse_and_recompute_give_autograds_gradient(dtype):
    """Both of GPTConfig.attention_backward's branches against each other and against autograd
    through plain softmax attention, with and without tangents (GN's passes carry them)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=dtype) for _ in range(3))
    tangents = [torch.randn_like(q) for _ in range(3)]
    cotangent = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(plain_attention(*leaves), leaves, cotangent)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    grads = {}
    for reuse in (True, False):
        for with_tangent in (False, True):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            with forward_ad.dual_level():
                inputs = [forward_ad.make_dual(x, t) for x, t in zip(leaves, tangents)] if with_tangent else leaves
                y = forward_ad.unpack_dual(CausalAttentionFunction.apply(*inputs, reuse)[0]).primal
            grads[reuse, with_tangent] = torch.autograd.grad(y, leaves, cotangent)
            for got, want in zip(grads[reuse, with_tangent], expected):
                torch.testing.assert_close(got, want, **tol)
    for got, want in zip(grads[False, True], grads[True, True]):
        torch.testing.assert_close(got, want, **tol)


def test_attention_backward_auto_reuses_on_the_cpu_only():
    choose = CausalAttentionFunction.reuses_probabilities
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose("auto", cpu) and not choose("auto", cuda)
    assert choose("reuse", cpu) and choose("reuse", cuda)
    assert not choose("recompute", cpu) and not choose("recompute", cuda)


# --- gn.py: exactness -------------------------------------------------------

def test_cross_entropy_leaves_out_ignored_targets_as_torch_does():
    # Targets of -100 (padding) count neither in the mean nor in g_z or H_z:
    # value, g_z, H_z u and the quadratic's pieces against autograd on F.cross_entropy.
    torch.manual_seed(3)
    z, u = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(2, 6, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 6))
    y[0, 1:4], y[1, 5] = -100, -100
    loss_of = lambda zz: F.cross_entropy(zz.flatten(0, 1), y.flatten())
    g = torch.autograd.functional.jacobian(loss_of, z)
    hu = torch.autograd.functional.hvp(loss_of, z, u)[1]
    torch.testing.assert_close(CrossEntropy.value(z, y), loss_of(z), rtol=1e-12, atol=0)
    torch.testing.assert_close(CrossEntropy.grad(z, y), g, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(CrossEntropy.hvp(z, y, u), hu, rtol=1e-12, atol=1e-15)
    value, slope, curvature, residual = CrossEntropy.quadratic(z, y, u)
    torch.testing.assert_close(value, loss_of(z), rtol=1e-12, atol=0)
    torch.testing.assert_close(slope, (g * u).sum(), rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(curvature, (hu * u).sum(), rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(residual, g + hu, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("case", cases(), ids=lambda c: c[0])
def test_gn_matvec_equals_explicit_jacobian_product(case):
    _, model, x, targets, loss = case
    f, params, flat, J, _, H, _ = explicit_pieces(model, x, targets, loss)
    v = torch.randn_like(flat.vector)
    got = flat.cat(gn_matvec(f, params, flat.dict(v), targets, loss=loss))
    torch.testing.assert_close(got, J.T @ H @ J @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_gn_is_the_hessian_for_a_linear_model(loss):
    torch.manual_seed(2)
    model = nn.Linear(5, 3).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, (9,)) if loss == "ce" else torch.randn(9, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    flat = Flat(params)
    f = lambda p: functional_call(model, p, (x,))
    loss_fn = F.cross_entropy if loss == "ce" else F.mse_loss
    v = torch.randn_like(flat.vector)
    _, hv = torch.autograd.functional.hvp(lambda w: loss_fn(f(flat.dict(w)), targets), flat.vector, v)
    got = flat.cat(gn_matvec(f, params, flat.dict(v), targets, loss=loss))
    torch.testing.assert_close(got, hv, rtol=1e-10, atol=1e-12)


def test_gn_matvec_float32_matches_float64():
    _, model, x, targets, loss = cases()[2]
    params = {k: v.detach() for k, v in model.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}
    exact = gn_matvec(lambda p: functional_call(model, p, (x,)), params, v, targets)
    model32 = model.float()
    got = gn_matvec(lambda p: functional_call(model32, p, (x,)), {k: p.float() for k, p in params.items()},
                    {k: t.float() for k, t in v.items()}, targets)
    for k in exact:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), exact[k], rtol=1e-3, atol=1e-6)


def test_layerwise_matvecs_are_the_block_diagonal_of_G():
    _, model, x, targets, _ = cases()[2]
    _, params, flat, J, _, H, _ = explicit_pieces(model, x, targets, "ce")
    G = J.T @ H @ J
    opt = GaussNewton(model, mode="layerwise", inner="adamw")
    assert opt.cached_inputs and len(opt.blocks) == 4
    in_block = torch.cat([torch.full((params[n].numel(),), i) for n in flat.names
                          for i, b in enumerate(opt.blocks) if n in b])
    block_diagonal = torch.where(in_block[:, None] == in_block[None, :], G, 0.0)
    v = flat.dict(torch.randn_like(flat.vector))
    got = {}
    for block, f_l in zip(opt.blocks, opt._block_functions(x)):  # f_l starts at its cached input
        got.update(gn_matvec(f_l, {n: params[n] for n in block}, {n: v[n] for n in block}, targets))
    torch.testing.assert_close(flat.cat(got), block_diagonal @ flat.cat(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prox_linear", [False, True], ids=["quadratic", "prox-linear"])
def test_inner_gradients_equal_gradients_of_their_objectives(prox_linear):
    _, model, x, targets, _ = cases()[2]
    f, params, flat, J, g, H, loss_of = explicit_pieces(model, x, targets, "ce")
    z0 = f(params).detach().reshape(-1)
    delta = (0.3 * torch.randn_like(flat.vector)).requires_grad_()
    jd = J @ delta
    if prox_linear:
        objective = loss_of(z0 + jd) - loss_of(z0)
    else:
        objective = g @ jd + 0.5 * jd @ H @ jd
    expected = torch.autograd.grad(objective, delta)[0]
    grad, change, loss0 = model_gradient(f, params, flat.dict(delta.detach()), targets, prox_linear=prox_linear)
    torch.testing.assert_close(flat.cat(grad), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(change, objective.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss0, loss_of(z0))


def test_damped_cg_step_solves_the_damped_least_squares_system():
    torch.manual_seed(3)
    A = torch.randn(40, 6, dtype=torch.float64)
    b = torch.randn(40, 2, dtype=torch.float64)
    for damping in (0.0, 0.5):
        model = nn.Linear(6, 2, bias=False).double()
        w0 = model.weight.detach().clone()
        opt = GaussNewton(model, mode="full", loss="mse", inner="cg", inner_steps=20, line_search="none",
                          damping=damping)
        opt.step([(A, b)])
        # Normal equations of mean((A Wᵀ - b)²) with damping λ/2 ‖W - W0‖².
        n = b.numel()
        lhs = 2 / n * A.T @ A + damping * torch.eye(6, dtype=torch.float64)
        rhs = 2 / n * A.T @ b + damping * w0.T
        torch.testing.assert_close(model.weight.detach(), torch.linalg.solve(lhs, rhs).T, rtol=1e-9, atol=1e-10)


def test_one_cg_step_lands_on_the_least_squares_solution():
    torch.manual_seed(4)
    A = torch.randn(50, 5, dtype=torch.float64)
    b = A @ torch.randn(5, 3, dtype=torch.float64) + 0.1 * torch.randn(50, 3, dtype=torch.float64)
    model = nn.Linear(5, 3).double()
    opt = GaussNewton(model, mode="full", loss="mse", inner="cg", inner_steps=18, line_search="none")
    opt.step([(A[:25], b[:25]), (A[25:], b[25:])])  # CG averages the quadratic over micro-batches
    ones = torch.ones(50, 1, dtype=torch.float64)
    solution = torch.linalg.lstsq(torch.cat([A, ones], 1), b).solution
    torch.testing.assert_close(model.weight.detach(), solution[:5].T, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(model.bias.detach(), solution[5], rtol=1e-8, atol=1e-9)


def test_gn_with_cg_converges_like_newton_on_logistic_regression():
    torch.manual_seed(5)
    x = torch.randn(200, 4, dtype=torch.float64)
    # Labels drawn from a softmax of a linear score: classes overlap, so the optimum is finite.
    labels = torch.multinomial((x @ torch.randn(4, 3, dtype=torch.float64)).softmax(-1), 1).squeeze(1)

    reference = nn.Linear(4, 3).double()
    lbfgs = torch.optim.LBFGS(reference.parameters(), lr=1, max_iter=500, tolerance_grad=1e-13,
                              tolerance_change=0, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = F.cross_entropy(reference(x), labels)
        loss.backward()
        return loss
    lbfgs.step(closure)
    best = F.cross_entropy(reference(x), labels).item()

    model = nn.Linear(4, 3).double()
    opt = GaussNewton(model, mode="full", inner="cg", inner_steps=15, line_search="backtracking")
    gaps = []
    for _ in range(8):
        opt.step([(x, labels)])
        gaps.append(F.cross_entropy(model(x), labels).item() - best)
    assert gaps[-1] < 1e-12
    assert min(i for i, gap in enumerate(gaps) if gap < 1e-10) <= 6, gaps
    # Newton's local quadratic convergence: the gap roughly squares once it is small.
    assert any(1e-9 < a < 1e-3 and b < a ** 1.5 for a, b in zip(gaps, gaps[1:])), gaps
    # The softmax logits are invariant to a shared shift, so compare probabilities.
    torch.testing.assert_close(model(x).softmax(-1), reference(x).softmax(-1), rtol=1e-5, atol=1e-6)


# --- gn.py: the optimizer on a transformer ---------------------------------

def byte_batches(n, seed, batch=8, seq=8, vocab=11):
    g = torch.Generator().manual_seed(seed)
    # A repetitive sequence the model can learn quickly: next = (3·prev + 1) mod vocab, with noise.
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        seqs = [start]
        for _ in range(seq):
            noise = (torch.rand(batch, 1, generator=g) < 0.1) * torch.randint(0, vocab, (batch, 1), generator=g)
            seqs.append((3 * seqs[-1] + 1 + noise) % vocab)
        s = torch.cat(seqs, 1)
        out.append((s[:, :-1], s[:, 1:]))
    return out


@pytest.mark.parametrize("mode,inner,combine", [("full", "adamw", "sum"), ("layerwise", "muon", "sum"),
                                                ("layerwise", "cg", "sum"), ("layerwise", "muon", "span")])
def test_gn_steps_lower_the_loss(mode, inner, combine):
    model = tiny_transformer().float()
    opt = GaussNewton(model, mode=mode, inner=inner, inner_lr=1.0 if inner == "cg" else 0.01, combine=combine)
    first = last = None
    for step in range(4):
        stats = opt.step(byte_batches(4, seed=step), byte_batches(2, seed=100 + step))
        assert stats["loss_after"] <= stats["loss_before"]
        first = first or stats["loss_before"]
        last = stats["loss_after"]
    assert last < first - 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_layerwise_path_equals_whole_forward_path(arch):
    batches, ls = byte_batches(3, seed=0), byte_batches(2, seed=1)
    results = []
    for reverse in (False, True):
        model = tiny_transformer(arch=arch)
        blocks = [names for _, names in model.gn_blocks()]
        # The same blocks in another order: the optimizer falls back to whole forward passes.
        opt = GaussNewton(model, inner="adamw", line_search="none", blocks=blocks[::-1] if reverse else blocks)
        assert opt.cached_inputs is not reverse
        opt.step(batches, ls)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


def test_runs_of_consecutive_blocks_start_from_the_cached_input_of_their_first():
    # The embedding with transformer block 0 (train.py --merge-embedding): that block's
    # pass starts at the tokens, the others at their cached inputs, and the step is the
    # one the whole forward passes give for the same four blocks.
    batches, ls = byte_batches(3, seed=0), byte_batches(2, seed=1)
    results = []
    for cached in (True, False):
        model = tiny_transformer()
        own = [names for _, names in model.gn_blocks()]
        opt = GaussNewton(model, inner="adamw", line_search="none", blocks=[own[0] + own[1]] + own[2:])
        assert opt.block_starts == [0] + list(range(2, len(own)))
        opt.cached_inputs = cached
        opt.step(batches, ls)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
    model = tiny_transformer()
    own = [names for _, names in model.gn_blocks()]
    assert GaussNewton(model, blocks=[own[0] + own[2], own[1]] + own[3:]).block_starts is None  # not consecutive


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("merge_embedding", [False, True], ids=["five-blocks", "embedding-with-block-0"])
def test_block_passes_sharing_their_primals_give_each_pass_alone(arch, merge_embedding, monkeypatch):
    # Every block's ∇Q at some Δ ≠ 0 with the passes sharing their primals (the model's
    # shared_primals) against each pass computing its own (a model without it).
    (x, y), = byte_batches(1, seed=0)
    model = tiny_transformer(arch=arch)
    own = [names for _, names in model.gn_blocks()]
    opt = GaussNewton(model, inner="adamw", blocks=[own[0] + own[1]] + own[2:] if merge_embedding else None)
    torch.manual_seed(1)
    for t in opt.iterate.values():
        t.add_(0.1 * torch.randn_like(t))
    reused = []  # per kernel forward: did it take a stored output?

    def stored_outputs(original=model_module._stored_outputs):
        stored = original()
        reused.append(stored is not None)
        return stored

    monkeypatch.setattr(model_module, "_stored_outputs", stored_outputs)
    shared = opt.inner_gradients(x, y)
    assert any(reused)
    reused.clear()
    with monkeypatch.context() as m:
        m.delattr(GPT, "shared_primals")
        alone = opt.inner_gradients(x, y)
    assert reused and not any(reused)
    for got, expected in zip(shared, alone):
        for n in expected:
            torch.testing.assert_close(got[n], expected[n], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["full", "layerwise"])
def test_attention_backward_reuse_and_recompute_give_the_same_inner_gradients(mode, monkeypatch):
    """Every block's ∇Q at some Δ ≠ 0 with attention's backward reusing P and recomputing it
    (GPTConfig.attention_backward): equal to each other and to J_lᵀ(g + H J_l Δ_l) from the explicit
    Jacobian, which autograd builds through SDPA without a tangent. Layerwise, the block passes share
    their primals; the store keeps attention's outputs (P among them) only when the backward reuses P."""
    torch.manual_seed(3)
    x, y = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))
    stores = []

    def recording_shared_primals(self, original=GPT.shared_primals):
        stores.append(original(self))
        return stores[-1]

    monkeypatch.setattr(GPT, "shared_primals", recording_shared_primals)
    _, params, flat, J, g, H, _ = explicit_pieces(tiny_transformer(), x, y, "ce")  # the same weights as below
    results = {}
    for branch in ("reuse", "recompute"):
        model = tiny_transformer(attention_backward=branch)
        opt = GaussNewton(model, mode=mode, inner="adamw")
        torch.manual_seed(1)
        for t in opt.iterate.values():
            t.add_(0.1 * torch.randn_like(t))
        stores.clear()
        results[branch] = opt.inner_gradients(x, y)
        if mode == "full":
            assert not stores  # one block: nothing to share
        else:
            kernels = {kernel for store in stores for _, kernel in store.outputs}
            assert model_module.LinearFunction in kernels
            assert (CausalAttentionFunction in kernels) == (branch == "reuse")
        for block, got in zip(opt.blocks, results[branch]):
            delta = opt._delta(block)
            Jd = J @ flat.cat({n: delta[n] if n in block else torch.zeros_like(p) for n, p in params.items()})
            expected = flat.dict(J.T @ (g + H @ Jd))
            for n in block:
                torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)
    for reused, recomputed in zip(results["reuse"], results["recompute"], strict=True):
        for n in reused:
            torch.testing.assert_close(recomputed[n], reused[n], rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["full", "layerwise"])
def test_gn_step_on_cuda_equals_cpu(mode):
    """The same float64 GN step on CUDA and on the CPU (the kernels, SDPA's
    switch and the cached layerwise path run on both)."""
    batches, ls = byte_batches(3, seed=0), byte_batches(2, seed=1)
    results = []
    for device in ("cpu", "cuda"):
        model = tiny_transformer().to(device)
        opt = GaussNewton(model, mode=mode, inner="adamw", line_search="none")
        opt.step([(x.to(device), y.to(device)) for x, y in batches], [(x.to(device), y.to(device)) for x, y in ls])
        results.append(torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("padded", [False, True])
def test_one_sgd_inner_step_from_zero_is_a_gradient_step(padded):
    # ∇Q(0) = Jᵀ g_z is the loss gradient, so a callable inner SGD taking one
    # unclipped step at constant lr moves θ by -lr ∇ℓ(θ0), as autograd says;
    # also with padding targets (-100), which the loss leaves out.
    model = tiny_transformer()
    (x, y), = byte_batches(1, seed=0)
    if padded:
        y = y.clone()
        y[:, ::3] = -100
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    expected = [p.detach() - 0.1 * g for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters())))]
    opt = GaussNewton(model, mode="full", inner=lambda named, lr: torch.optim.SGD([t for _, t in named], lr=lr),
                      inner_lr=0.1, inner_schedule="constant", clip=None, line_search="none")
    opt.step([(x, y)])
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["full", "layerwise"])
def test_inner_gradients_at_the_origin_are_the_loss_gradient(mode):
    # At Δ = 0 every block's ∇Q is its share of ∇ℓ(θ0), whatever the damping:
    # the first inner step's plain forward and backward must agree with
    # autograd's gradient, as must the pass that carries the (zero) tangent.
    model = tiny_transformer()
    (x, y), = byte_batches(1, seed=0)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    expected = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    opt = GaussNewton(model, mode=mode, damping=0.1)
    plain, with_tangent = opt.inner_gradients(x, y, at_origin=True), opt.inner_gradients(x, y)
    assert [list(g) for g in plain] == opt.blocks
    for grads in (plain, with_tangent):
        for block in grads:
            for n, g in block.items():
                torch.testing.assert_close(g, expected[n], rtol=1e-10, atol=1e-12)


def test_full_mode_is_the_one_block_case():
    batches = byte_batches(2, seed=0)
    results = []
    for mode, blocks in (("full", None), ("layerwise", "one")):
        model = tiny_transformer()
        if blocks == "one":
            blocks = [[n for n, _ in model.named_parameters()]]
        GaussNewton(model, mode=mode, inner="adamw", line_search="none", blocks=blocks).step(batches)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("inner,adaptive_reach", [("muon", False), ("cg", False), ("muon", True)])
def test_state_dict_round_trip_continues_identically(inner, adaptive_reach):
    model = tiny_transformer().float()
    opt = GaussNewton(model, inner=inner, keep_iterate=True, adaptive_reach=adaptive_reach)
    opt.step(byte_batches(2, seed=0))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # as a checkpoint on disk would hold it
    assert (saved_opt["reach"] != 1.0) == adaptive_reach  # the first step moved the reach: resume must restore it
    opt.step(byte_batches(2, seed=1))
    expected = [p.detach().clone() for p in model.parameters()]

    resumed = tiny_transformer(seed=9).float()
    resumed.load_state_dict(saved_model)
    opt2 = GaussNewton(resumed, inner=inner, keep_iterate=True, adaptive_reach=adaptive_reach)
    opt2.load_state_dict(saved_opt)
    opt2.step(byte_batches(2, seed=1))
    for a, b in zip(expected, resumed.parameters()):
        assert torch.equal(a, b.detach())


def test_kept_iterate_starts_at_the_weights_of_the_first_step():
    """Weights that move between building the optimizer and its first step (train.py's
    --first-order-steps) are where the first inner loop starts, with keep_iterate too."""
    batches = byte_batches(2, seed=0)
    results = []
    for built_before_the_weights_moved in (True, False):
        model = tiny_transformer(seed=9).float()
        opt = GaussNewton(model, inner="muon", keep_iterate=True) if built_before_the_weights_moved else None
        model.load_state_dict(tiny_transformer(seed=0).float().state_dict())
        opt = opt or GaussNewton(model, inner="muon", keep_iterate=True)
        opt.step(batches)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_non_finite_quadratic_is_rejected_and_weights_kept():
    model = tiny_transformer()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 11, (2, 5))
    bad_targets = torch.full((2, 5, 11), float("nan"), dtype=torch.float64)
    stats = GaussNewton(model, loss="mse", inner="adamw").step([(x, bad_targets)])
    assert stats["rejected"] and not stats["finite"]
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b.detach())


def test_line_search_grid_contains_the_papers_points():
    grid = step_size_grid(0.25)
    torch.testing.assert_close(torch.tensor(grid), torch.tensor([1, 2 ** -0.5, 0.5, 2 ** -1.5, 0.25]))
    assert step_size_grid(2 ** -5)[5:] == [2 ** -3, 2 ** -4, 2 ** -5]
    assert step_size_grid(0.5) == [1, 2 ** -0.5, 0.5]


def linear_problem(loss, seed):
    """A linear model, a batch for `loss` and a random direction d."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(5, 3).double()
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (torch.randn(40, 3, generator=g, dtype=torch.float64) if loss == "mse"
         else torch.randint(0, 3, (40,), generator=g))
    params = {k: v.detach() for k, v in model.named_parameters()}
    d = {k: 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    return model, params, d, [(x, y)]


def forward_of(model):
    """The outputs at given parameters: the forward(params, x) that the line search takes."""
    return lambda params, x: functional_call(model, params, (x,))


def loss_along(model, params, d, batch, loss, eta):
    x, y = batch
    z = functional_call(model, {k: params[k] + eta * d[k] for k in params}, (x,))
    return F.mse_loss(z, y) if loss == "mse" else F.cross_entropy(z, y)


def test_model_step_is_the_exact_minimizer_along_d_on_least_squares():
    """For a linear model and squared error GN is exact: the loss along d is a parabola,
    which three evaluations determine; η* = -gᵀd / dᵀGd must be its vertex."""
    model, params, d, batches = linear_problem("mse", seed=7)
    if directional_model(forward_of(model), params, d, batches, MeanSquaredError)[1] > 0:
        d = {k: -v for k, v in d.items()}  # make d a descent direction
    f = [loss_along(model, params, d, batches[0], "mse", eta).item() for eta in (0.0, 1.0, 2.0)]
    a, b = (f[2] - 2 * f[1] + f[0]) / 2, (4 * f[1] - 3 * f[0] - f[2]) / 2  # f(η) = f0 + bη + aη²
    loss0, slope, curvature = directional_model(forward_of(model), params, d, batches, MeanSquaredError)
    assert loss0 == pytest.approx(f[0], rel=1e-12)
    assert slope == pytest.approx(b, rel=1e-9) and curvature == pytest.approx(2 * a, rel=1e-9)
    assert model_step_size(slope, curvature, largest=float("inf")) == pytest.approx(-b / (2 * a), rel=1e-9)
    # the model rule takes that step when it is at most 1 (scale d so that it is), after one loss evaluation
    scale = 2 * model_step_size(slope, curvature, largest=float("inf"))
    d = {k: v * scale for k, v in d.items()}
    eta, _, loss1, _, _ = line_search(forward_of(model), params, d, batches, MeanSquaredError, "model", 0.25)
    assert eta == pytest.approx(0.5, rel=1e-9)
    assert loss1 == pytest.approx(f[0] - b ** 2 / (4 * a), rel=1e-9)  # the parabola's minimum


def test_model_step_minimizes_the_gn_quadratic_built_from_explicit_jacobians():
    """Cross-entropy on a linear model: slope = ∇ℓᵀJd from autograd, curvature = (Jd)ᵀ H (Jd)
    with H the Hessian of the loss in the logits from torch.autograd.functional.hessian."""
    model, params, d, batches = linear_problem("ce", seed=8)
    x, y = batches[0]
    z0 = functional_call(model, params, (x,))
    jd = functional_call(model, d, (x,)) - functional_call(model, {k: 0 * v for k, v in d.items()}, (x,))
    H = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z, y), z0).reshape(z0.numel(), -1)
    curvature = (jd.reshape(-1) @ H @ jd.reshape(-1)).item()
    eta = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    slope = torch.autograd.grad(loss_along(model, params, d, batches[0], "ce", eta), eta)[0].item()
    loss0, got_slope, got_curvature = directional_model(forward_of(model), params, d, batches, CrossEntropy)
    assert got_slope == pytest.approx(slope, rel=1e-9) and got_curvature == pytest.approx(curvature, rel=1e-9)
    expected = -slope / curvature if slope < 0 else 0.0
    assert model_step_size(got_slope, got_curvature, largest=float("inf")) == pytest.approx(expected, rel=1e-9)
    assert model_step_size(-1.0, 4.0) == 0.25 and model_step_size(-1.0, 0.1) == 1.0  # clipped at largest
    assert model_step_size(0.5, 4.0) == 0.0 and model_step_size(-1.0, 0.0) == 1.0


def test_model_step_from_some_batches_is_checked_on_all():
    """model_batches=2 of 4: slope, curvature and η* are those of the first two batches' parabola
    (least squares: GN exact), while ℓ(θ0) and the loss at the step are the means over all four."""
    torch.manual_seed(0)
    model, params, _, _ = linear_problem("mse", seed=11)
    g = torch.Generator().manual_seed(12)
    batches = [tuple(torch.randn(10, n, generator=g, dtype=torch.float64) for n in (5, 3)) for _ in range(4)]
    leaves = {k: p.clone().requires_grad_() for k, p in params.items()}
    grads = torch.autograd.grad(sum(F.mse_loss(functional_call(model, leaves, (x,)), y) for x, y in batches),
                                list(leaves.values()))
    d = {k: -g for k, g in zip(params, grads)}  # downhill on all four batches

    def mean_loss(bs, eta):
        return sum(loss_along(model, params, d, b, "mse", eta).item() for b in bs) / len(bs)

    def parabola(bs):  # f(η) = f0 + bη + aη²
        f = [mean_loss(bs, eta) for eta in (0.0, 1.0, 2.0)]
        return (f[2] - 2 * f[1] + f[0]) / 2, (4 * f[1] - 3 * f[0] - f[2]) / 2

    a, b = parabola(batches[:2])
    assert b < 0  # downhill on the first two as well
    d = {k: v * 2 * (-b / (2 * a)) for k, v in d.items()}  # the first two batches' vertex now at η = 1/2
    a, b = parabola(batches[:2])
    a_all, b_all = parabola(batches)
    assert abs(-b_all / (2 * a_all) - 0.5) > 0.02  # so the batches η* comes from are told apart
    eta, loss0, loss1, slope, curvature = line_search(forward_of(model), params, d, batches, MeanSquaredError, "model", 0.25,
                                                      model_batches=2)
    assert slope == pytest.approx(b, rel=1e-9) and curvature == pytest.approx(2 * a, rel=1e-9)
    assert eta == pytest.approx(0.5, rel=1e-9)
    assert loss0 == pytest.approx(mean_loss(batches, 0.0), rel=1e-12)
    assert loss1 == pytest.approx(mean_loss(batches, 0.5), rel=1e-12)


@pytest.mark.parametrize("combine", COMBINES)
def test_optimizer_estimates_the_model_on_its_share_of_the_line_search_batches(combine, monkeypatch):
    """η*'s model (and the span's: both go through span_model) sees the first share of the line-search batches."""
    import gn
    seen, span_model = [], gn.span_model

    def recording_span_model(functions, params, directions, batches, H):
        seen.append(batches)
        return span_model(functions, params, directions, batches, H)

    monkeypatch.setattr(gn, "span_model", recording_span_model)
    ls = byte_batches(4, seed=1)
    for fraction, expected in ((0.5, 2), (1.0, 4), (0.1, 1)):
        seen.clear()
        opt = GaussNewton(tiny_transformer(), mode="layerwise", combine=combine, ls_model_fraction=fraction)
        opt.step(byte_batches(2, seed=0), ls)
        assert seen == [ls[:expected]]


def test_line_search_reaches_below_its_floor_when_the_model_step_lies_there():
    """A direction 100 times too long: η* ≈ 1/100 is below the floor 1/4, and every rule still finds a
    step that lowers the loss instead of rejecting the direction."""
    model, params, d, batches = linear_problem("mse", seed=9)
    if directional_model(forward_of(model), params, d, batches, MeanSquaredError)[1] > 0:
        d = {k: -v for k, v in d.items()}
    _, slope, curvature = directional_model(forward_of(model), params, d, batches, MeanSquaredError)
    d = {k: v * 100 * model_step_size(slope, curvature, largest=float("inf")) for k, v in d.items()}
    for method in ("model", "grid", "backtracking"):
        eta, loss0, loss1, _, _ = line_search(forward_of(model), params, d, batches, MeanSquaredError, method, 0.25)
        assert 0 < eta < 0.25 and loss1 < loss0, method
    eta = line_search(forward_of(model), params, d, batches, MeanSquaredError, "model", 0.25)[0]
    assert eta == pytest.approx(0.01, rel=1e-9)


def test_span_model_equals_the_system_built_from_explicit_jacobians():
    """s_l = gᵀ J d_l and M_lm = (J d_l)ᵀ H (J d_m) from the explicit Jacobian and loss Hessian of a tiny
    GPT, through the layerwise optimizer's cached block inputs; c minimizes the model over the box."""
    torch.manual_seed(3)
    model = tiny_transformer()
    (x, y), = byte_batches(1, seed=5)
    f, params, flat, J, g, H, loss_of = explicit_pieces(model, x, y, "ce")
    opt = GaussNewton(model, mode="layerwise", combine="span")
    assert opt.cached_inputs
    # Descent directions of very different lengths: the block solves' typical mismatch.
    gradient = flat.dict(J.T @ g)
    directions = [{n: -(4.0 ** l) * gradient[n] for n in block} for l, block in enumerate(opt.blocks)]
    jd = [J @ flat.cat({n: directions[l].get(n, torch.zeros_like(p)) for n, p in params.items()})
          for l in range(len(directions))]
    s = torch.stack([g @ u for u in jd])
    M = torch.stack([torch.stack([u @ H @ v for v in jd]) for u in jd])
    loss0, got_s, got_M = span_model(opt._block_functions, params, directions, [(x, y)], CrossEntropy)
    assert loss0 == pytest.approx(loss_of(f(params).reshape(-1)).item(), rel=1e-12)
    torch.testing.assert_close(got_s, s, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(got_M, M, rtol=1e-9, atol=1e-14)
    # c minimizes the model over the box [0, 1]ⁿ: the KKT conditions, from the explicit system
    c = span_step_sizes(got_s, got_M)
    residual = s + M @ c
    inside = (c > 1e-9) & (c < 1 - 1e-9)
    assert inside.any() and not inside.all()  # the case tests both kinds of coordinate
    torch.testing.assert_close(residual[inside], torch.zeros_like(residual[inside]), rtol=0, atol=1e-9 * s.abs().max())
    assert (residual[c <= 1e-9] >= 0).all() and (residual[c >= 1 - 1e-9] <= 0).all()


def test_span_step_with_one_block_is_the_scalar_model_step():
    batches, ls = byte_batches(3, seed=0), byte_batches(2, seed=1)
    results = []
    for combine in ("sum", "span"):
        model = tiny_transformer()
        stats = GaussNewton(model, mode="full", inner="adamw", inner_lr=0.3, min_step_size=1 / 16,
                            combine=combine).step(batches, ls)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert 0 < stats["block_step_sizes"][0] < 1
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
    _, slope, curvature = directional_model(forward_of(model), {k: v.detach() for k, v in model.named_parameters()},
                                            {k: torch.ones_like(v) for k, v in model.named_parameters()}, ls,
                                            CrossEntropy)
    c = span_step_sizes(torch.tensor([slope], dtype=torch.float64), torch.tensor([[curvature]], dtype=torch.float64))
    assert c.item() == pytest.approx(model_step_size(slope, curvature), rel=1e-12)


class TwoPathsAndOne(nn.Module):
    """z = (A + B) x_1 + C x_2: blocks a and b each fit the whole x_1 part on their own."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(3, 2, bias=False).double() for _ in range(3))

    def forward(self, x):
        return self.a(x[:, :3]) + self.b(x[:, :3]) + self.c(x[:, 3:])


@pytest.mark.parametrize("combine", ["sum", "span"])
def test_span_step_lands_on_least_squares_where_one_step_size_cannot(combine):
    """Exact block solves (CG) of a least-squares problem in which blocks a and b duplicate each other:
    summed, a and b overshoot twice while c is exact, so no single step size reaches the optimum; the
    span's coefficients (½, ½, 1) do, in one step."""
    torch.manual_seed(4)
    model = TwoPathsAndOne()
    # x_1 ⟂ x_2, so that block c's own solve is the optimum's C
    x, y = torch.linalg.qr(torch.randn(50, 6, dtype=torch.float64))[0] * 5, torch.randn(50, 2, dtype=torch.float64)
    optimum = F.mse_loss(x @ torch.linalg.lstsq(x, y).solution, y).item()
    opt = GaussNewton(model, loss="mse", inner="cg", inner_steps=12, combine=combine, min_step_size=1e-3)
    stats = opt.step([(x, y)])
    loss = F.mse_loss(model(x), y).item()
    if combine == "span":
        assert loss == pytest.approx(optimum, rel=1e-9)
        assert sorted(stats["block_step_sizes"]) == pytest.approx([0.5, 0.5, 1.0], rel=1e-6)
    else:
        assert loss > optimum * (1 + 1e-3)


def test_papers_rule_takes_the_best_half_power_and_always_steps():
    """Along an ascent direction the grid rejects (η = 0) while the authors' rule still takes the
    least bad point of 1, 2^-1/2, ..., down to the floor; along descent both pick the grid's best."""
    model, params, d, batches = linear_problem("mse", seed=10)
    if directional_model(forward_of(model), params, d, batches, MeanSquaredError)[1] < 0:
        d = {k: -v for k, v in d.items()}  # make d an ascent direction
    eta, loss0, loss1, _, _ = line_search(forward_of(model), params, d, batches, MeanSquaredError, "paper", 2 ** -4.5)
    assert eta == 2 ** -4.5 and loss1 > loss0  # the smallest of the ten points, and a worse loss
    assert line_search(forward_of(model), params, d, batches, MeanSquaredError, "grid", 2 ** -4.5)[0] == 0.0
    d = {k: -3 * v for k, v in d.items()}
    grid = [2 ** (-k / 2) for k in range(10)]
    losses = [loss_along(model, params, d, batches[0], "mse", eta).item() for eta in grid]
    eta = line_search(forward_of(model), params, d, batches, MeanSquaredError, "paper", 2 ** -4.5)[0]
    assert eta == grid[losses.index(min(losses))]


def test_bad_arguments_raise_clear_errors():
    model = tiny_transformer()
    with pytest.raises(ValueError, match="mode"):
        GaussNewton(model, mode="diagonal")
    with pytest.raises(ValueError, match="model, grid, backtracking, none, paper"):
        GaussNewton(model, line_search="wolfe")
    with pytest.raises(ValueError, match="sum, span"):
        GaussNewton(model, combine="blockwise")
    with pytest.raises(ValueError, match="inner"):
        GaussNewton(model, inner="sgd")
    with pytest.raises(ValueError, match="exactly once"):
        GaussNewton(model, blocks=[["head.weight"]])
    with pytest.raises(ValueError, match="prox_linear"):
        GaussNewton(model, inner="cg", prox_linear=True)


def test_next_reach_follows_how_the_line_search_went():
    assert next_reach(1.0, 0.0, 1.0, 0.0) == 1 / 8  # rejected
    assert next_reach(1.0, 0.125, 0.5, 0.9) == 0.25  # Armijo halved η* twice: the model held a quarter as far
    assert next_reach(1.0, 2.0 ** -8, 0.5, 0.9) == 1 / 8  # by at most 1/8 a step
    assert next_reach(1.0, 0.5, 0.5, 0.1) == 1.0  # taken as tried, a tenth of the predicted decrease: stays
    assert next_reach(1.0, 1.0, 1.0, 0.9) == 2.0  # a whole step the model predicted
    assert next_reach(1.0, 0.3, 0.3, 0.5) == 2.0  # an η* below 1 that held as well as that
    assert next_reach(1.0, 1.0, 1.0, 0.25) == 2.0 and next_reach(1.0, 1.0, 1.0, 0.24) == 1.0
    assert next_reach(16.0, 1.0, 1.0, 1.0) == 16.0 and next_reach(2.0 ** -10, 0.0, 1.0, 0.0) == 2.0 ** -10


def test_adaptive_reach_grows_to_whole_steps_on_an_exact_quadratic():
    """Least squares on a linear model: the GN model is the loss, so every step the model predicts
    is taken whole and decreases the loss by exactly the prediction; an inner loop that stops short
    (a tiny inner lr) doubles its reach every step, up to the cap."""
    model, params, _, batches = linear_problem("mse", seed=3)
    opt = GaussNewton(model, mode="full", loss="mse", inner="adamw", inner_lr=1e-4, clip=None, adaptive_reach=True)
    reaches = []
    for _ in range(6):
        stats = opt.step(batches * 4, ls_batches=batches)
        reaches.append(stats["reach"])
        x, y = batches[0]
        assert stats["step_size"] == 1.0
        assert stats["loss_before"] - stats["loss_after"] == pytest.approx(stats["predicted_decrease"], rel=1e-9)
        assert stats["loss_after"] == pytest.approx(F.mse_loss(model(x), y).item(), rel=1e-12)
    assert reaches == [1.0, 2.0, 4.0, 8.0, 16.0, 16.0] and opt.reach == 16.0


def test_adaptive_reach_shrinks_where_the_quadratic_model_fails_far_from_the_weights():
    """A tanh network, whose GN model holds near the weights only: where the model's own step η*
    fails the Armijo test (the true loss there fell by far less than the model said), the step is
    cut and the next inner loop reaches less far, by the cut's factor; whole steps the model
    predicted well let it reach further. No step is rejected and the loss falls."""
    model = small_mlp(2)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 4, generator=g, dtype=torch.float64),
                torch.randn(64, 2, generator=g, dtype=torch.float64))]
    opt = GaussNewton(model, mode="full", loss="mse", inner="adamw", inner_lr=0.3, clip=None, adaptive_reach=True)
    steps = [opt.step(batches * 8, ls_batches=batches) for _ in range(5)]
    reaches = [s["reach"] for s in steps] + [opt.reach]
    cut = [i for i, s in enumerate(steps) if s["step_size"] < model_step_size(s["slope"], s["curvature"])]
    assert cut, "the model step held everywhere: no failure to react to"
    for i in cut:
        tried = model_step_size(steps[i]["slope"], steps[i]["curvature"])
        assert reaches[i + 1] == pytest.approx(reaches[i] * steps[i]["step_size"] / tried)
    assert any(reaches[i + 1] > reaches[i] for i in range(5) if i not in cut)
    assert not any(s["rejected"] for s in steps)
    assert steps[-1]["loss_after"] < steps[0]["loss_before"]


def test_adaptive_reach_needs_a_line_search_that_tries_a_step_first():
    model = small_mlp(2)
    for kwargs in ({"line_search": "grid"}, {"line_search": "paper"}, {"inner": "cg"}):
        with pytest.raises(ValueError, match="adaptive_reach"):
            GaussNewton(model, mode="full", loss="mse", adaptive_reach=True, **kwargs)


def test_adaptive_reach_is_on_by_default_wherever_it_applies():
    model = small_mlp(2)
    assert GaussNewton(model, mode="full", loss="mse").adaptive_reach
    assert GaussNewton(model, mode="full", loss="mse", line_search="backtracking").adaptive_reach
    for kwargs in ({"line_search": "grid"}, {"line_search": "paper"}, {"inner": "cg"}, {"adaptive_reach": False}):
        assert not GaussNewton(model, mode="full", loss="mse", **kwargs).adaptive_reach
