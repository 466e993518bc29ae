"""A LLaMA-style decoder-only transformer, small enough to read in one sitting.

Token embedding, pre-norm blocks (RMSNorm, causal multi-head attention with
rotary position embeddings, SwiGLU MLP), a final RMSNorm and an untied output
head: LLaMA, which the GN paper builds on (Abreu et al. 2025). GPTConfig's
options switch to the authors' own variant of it (presets paper45m and
paper150m): a GELU MLP, separate q, k and v matrices, LayerNorm on queries
and keys, and their init.

Three things here exist for Gauss-Newton (gn.py):
- Forward-mode AD works through the whole model, and cheaply: linear layers,
  RMSNorm, LayerNorm, rotary, SwiGLU, GELU and attention are autograd
  Functions with their own tangent and gradient formulas (see "Kernels"
  below), so that no tangent drags an autograd graph along.
  `F.scaled_dot_product_attention` has no forward-mode derivative, so
  attention switches to its Function when its inputs carry a tangent.
- `gn_blocks()` names the parameter blocks of layerwise GN, and
  `forward(h, start_block=i)` runs the network from the input of block i, so that
  layerwise GN can cache block inputs instead of rerunning the blocks below
  (`forward(idx, inputs=[])` records them on the way).
- `shared_primals()` gives a store with which layerwise GN's block passes on
  one micro-batch compute every kernel's primal output once, not once per block.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad


ATTENTION_BACKWARDS = ("auto", "reuse", "recompute")  # GPTConfig.attention_backward


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128  # longest sequence the rotary tables cover
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 96
    mlp_hidden: int = 256  # MLP inner width (LLaMA's SwiGLU uses about 8/3 of n_embd, the authors' GELU 4x)
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    # The defaults are LLaMA's; the paper presets switch to the authors' choices.
    mlp: str = "swiglu"  # or "gelu": two matrices around a tanh-approximate GELU
    qkv: str = "fused"  # or "separate": q, k and v matrices of their own (Muon orthogonalizes each)
    qk_norm: bool = False  # LayerNorm (weight, bias) on queries and keys before rotary, across all heads at once
    # "gpt2": N(0, 0.02²) weights, residual projections scaled by 1/√(2 n_layer);
    # or "fan_in": N(0, 1/fan_in) matrices and a N(0, 1) embedding
    init: str = "gpt2"
    # How attention's backward gets its gradient in passes that carry a tangent
    # (GN's): "reuse" the probabilities the forward kept, or "recompute" them in
    # SDPA's backward; "auto": reuse on a CPU, recompute on CUDA. The same
    # gradient up to round-off (CausalAttentionFunction).
    attention_backward: str = "auto"

    def __post_init__(self):
        if (self.mlp not in ("swiglu", "gelu") or self.qkv not in ("fused", "separate")
                or self.init not in ("gpt2", "fan_in")):
            raise ValueError(f"unknown mlp {self.mlp!r}, qkv {self.qkv!r} or init {self.init!r}")
        if self.attention_backward not in ATTENTION_BACKWARDS:
            raise ValueError(f"unknown attention_backward {self.attention_backward!r}: "
                             f"one of {', '.join(ATTENTION_BACKWARDS)}")
        if self.qk_norm and self.qkv != "separate":
            raise ValueError("qk_norm normalizes the outputs of separate q and k matrices: it needs qkv='separate'")


# The authors' architecture (natalieabreu/full-gauss-newton,
# EasyLM/models/llama/llama_model.py). Their rotary pairs adjacent features of
# a head, ours its two halves: the same model up to a fixed permutation of the
# query and key features, which the LayerNorm and the random init do not see.
# Their init: std initializer_range/√fan_in for matrices, initializer_range for
# the embedding, and their run scripts set initializer_range=1.0.
PAPER_ARCH = dict(mlp="gelu", qkv="separate", qk_norm=True, init="fan_in")

# `tiny` (0.38M parameters) trains in minutes on 2 CPU cores; `mini` (1.3M)
# and `small` (4.9M) are the rungs above it on the model-size ladder
# (compare.py --model-sizes). `45m` and `150m` are our LLaMA-style models at
# the paper's sizes, with a 32k vocabulary (the exact count depends
# on the data's vocabulary). `paper45m` and `paper150m` are the authors' models
# exactly (their presets 45M and 150M, vocabulary 32000, rotary tables as long
# as their max_position_embeddings; they train on 1024-token sequences).
PRESETS = {
    "tiny": GPTConfig(vocab_size=256, block_size=128, n_layer=3, n_head=4, n_embd=96, mlp_hidden=256),
    "mini": GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=5, n_embd=160, mlp_hidden=432),
    "small": GPTConfig(vocab_size=256, block_size=256, n_layer=6, n_head=8, n_embd=256, mlp_hidden=688),
    "45m": GPTConfig(vocab_size=32000, block_size=1024, n_layer=4, n_head=8, n_embd=512, mlp_hidden=1376),
    "150m": GPTConfig(vocab_size=32000, block_size=1024, n_layer=12, n_head=12, n_embd=768, mlp_hidden=2560),
    "paper45m": GPTConfig(vocab_size=32000, block_size=2048, n_layer=4, n_head=8, n_embd=512, mlp_hidden=2048,
                          **PAPER_ARCH),
    "paper150m": GPTConfig(vocab_size=32000, block_size=1024, n_layer=12, n_head=16, n_embd=768, mlp_hidden=3072,
                           **PAPER_ARCH),
}


# ---------------------------------------------------------------------------
# Kernels with hand-written derivatives, forward mode (jvp) and reverse mode.
#
# GN's inner step runs the network once carrying a tangent (forward-mode AD)
# while autograd records the primal computation for one backward pass. Left
# to itself, PyTorch also records every tangent computation that touches an
# activation requiring grad (so that tangents could be differentiated again,
# reverse-over-forward), and each such recorded op keeps its inputs alive
# until the backward. GN never differentiates a tangent; in the kernels below
# the tangent comes from detached saved tensors, so no tangent carries a graph.
# That cuts GN's peak memory and time (results/README.md). Views, residual
# adds and the embedding lookup need nothing: their tangent never meets an
# activation. Rotary is a Function only because autograd's tangent formula for
# a product with a constant table takes a slow path through zero tensors.
# Inputs without a tangent reach `jvp` as None (set_materialize_grads(False)),
# so no work is wasted on zeros: in layerwise GN most weights carry no tangent.
# Each kernel's jvp and backward are checked against finite differences in
# test_gn.py.
# ---------------------------------------------------------------------------

def has_tangent(x):
    """True inside torch.func.jvp or forward_ad when x carries a tangent."""
    return forward_ad.unpack_dual(x).tangent is not None


def _save(ctx, *tensors):
    """Keep detached tensors for jvp and backward: no tangent, no graph."""
    ctx.set_materialize_grads(False)
    tensors = [t.detach() for t in tensors]
    ctx.save_for_forward(*tensors)
    ctx.save_for_backward(*tensors)


def _once(ctx, formula, release=False):
    """formula(*saved tensors), computed once: backward reuses what jvp (GN) computed, and releases it."""
    value = getattr(ctx, "computed", None)
    if value is None:
        value = formula(*ctx.saved_tensors)
    ctx.computed = None if release else value
    return value


# ---------------------------------------------------------------------------
# Primals shared between the block passes of layerwise GN.
#
# Layerwise GN runs one pass per block over the same micro-batch, every pass
# with every weight at θ0: only the tangent differs (block l's own), so every
# kernel's primal output is the same in every pass. With a `SharedPrimals`
# store each kernel call site (a module) computes its forward once; later passes
# take the stored output, and each pass's jvp and backward still work from
# its own saved tensors, instead of rerunning the primal of every layer from
# l up. (Rotary, a cheap rotation, is recomputed.)
# ---------------------------------------------------------------------------

class SharedPrimals:
    """A store of kernel outputs: inside `with store:` each kernel call site
    computes its primal output once, and every later call (in this `with` or a
    later one on the same store) takes it instead.

    Valid only while the weights' primal values and the inputs stay the same,
    as across the tangent passes of GN's blocks on one micro-batch (gn.py),
    and only for modules that call each kernel once per forward, as every
    module here does. Holds one forward's kernel outputs, the logits
    included, for as long as the store lives.
    """
    active = None  # the store inside whose `with` the kernels run, if any
    pending = None  # what the next kernel forward returns instead of computing

    def __init__(self):
        self.outputs = {}  # (site, kernel) -> primal outputs, detached

    def __enter__(self):
        self.outer, SharedPrimals.active = SharedPrimals.active, self
        return self

    def __exit__(self, *exc):
        SharedPrimals.active = self.outer


def apply_kernel(site, kernel, *args, share=True):
    """kernel.apply(*args); inside a `SharedPrimals` store, its forward runs once per (site, kernel)."""
    store = SharedPrimals.active
    if store is None or not share:
        return kernel.apply(*args)
    key = (site, kernel)
    SharedPrimals.pending = store.outputs.get(key)
    try:
        result = kernel.apply(*args)
    finally:
        SharedPrimals.pending = None
    if key not in store.outputs:
        store.outputs[key] = _detached(result)
    return result


def _detached(outputs):
    return tuple(t.detach() for t in outputs) if isinstance(outputs, tuple) else outputs.detach()


def _stored_outputs():
    """The primal outputs `apply_kernel` found stored for this forward, or None: a kernel's forward returns them."""
    stored, SharedPrimals.pending = SharedPrimals.pending, None
    # Fresh aliases: autograd attaches this call's graph and tangent to them.
    return None if stored is None else _detached(stored)


def _or_stored(forward):
    """A kernel's forward that returns the outputs `apply_kernel` found stored, if any, instead of computing them."""
    @functools.wraps(forward)
    def forward_or_stored(*args):
        stored = _stored_outputs()
        return forward(*args) if stored is None else stored
    return forward_or_stored


class LinearFunction(torch.autograd.Function):
    """y = x Wᵀ. Tangent dx Wᵀ + x dWᵀ; gradients g W and gᵀx."""
    generate_vmap_rule = True

    @staticmethod
    @_or_stored
    def forward(x, weight):
        return F.linear(x, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    @staticmethod
    def jvp(ctx, dx, dweight):
        x, weight = ctx.saved_tensors
        if dx is None or dweight is None:
            return F.linear(x, dweight) if dx is None else F.linear(dx, weight)
        # dx Wᵀ + x dWᵀ, the sum accumulated inside the second product.
        return F.linear(dx, weight).flatten(0, -2).addmm_(x.flatten(0, -2), dweight.t()).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None
        x, weight = ctx.saved_tensors
        gx = g @ weight if ctx.needs_input_grad[0] else None
        gw = g.flatten(0, -2).t() @ x.flatten(0, -2) if ctx.needs_input_grad[1] else None
        return gx, gw


class Linear(nn.Linear):
    """nn.Linear without bias, through LinearFunction whenever a tangent is present."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        if has_tangent(x) or has_tangent(self.weight):
            return apply_kernel(self, LinearFunction, x, self.weight)
        return F.linear(x, self.weight)


class RMSNormFunction(torch.autograd.Function):
    """y = n ⊙ w with n = x r, r = 1/√(mean(x²) + eps) over the last dimension.

    Tangent dn = r (dx - n mean(n ⊙ dx)); the gradient is its adjoint,
    g_x = r (g_n - n mean(n ⊙ g_n)) with g_n = g ⊙ w. n and r are returned
    as extra, non-differentiable outputs so that jvp and backward need not
    recompute them.
    """
    generate_vmap_rule = True

    @staticmethod
    @_or_stored
    def forward(x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        n = x * r
        return n * weight, n, r

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, n, r = output
        ctx.mark_non_differentiable(n, r)
        _save(ctx, n, r, inputs[1])

    @staticmethod
    def _project(n, r, u):
        """r (u - n mean(n ⊙ u))."""
        mean = torch.linalg.vecdot(n, u).unsqueeze(-1).div_(n.shape[-1])
        return torch.addcmul(u, n, mean, value=-1).mul_(r)

    @staticmethod
    def jvp(ctx, dx, dweight, _):
        n, r, weight = ctx.saved_tensors
        dy = None if dx is None else RMSNormFunction._project(n, r, dx).mul_(weight)
        if dweight is not None:
            dy = n * dweight if dy is None else dy.addcmul_(n, dweight)
        return dy, None, None

    @staticmethod
    def backward(ctx, g, *_):
        if g is None:
            return None, None, None
        n, r, weight = ctx.saved_tensors
        gx = RMSNormFunction._project(n, r, g * weight) if ctx.needs_input_grad[0] else None
        gw = (g * n).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gw, None


def _center(u):
    return u - u.mean(-1, keepdim=True)


class LayerNormFunction(torch.autograd.Function):
    """y = n ⊙ w + b with n = c r, c = x - mean(x), r = 1/√(mean(c²) + eps).

    RMSNorm of the centred c. Centring is a symmetric projection and n is
    already centred, so the tangent is RMSNorm's of the centred dx, the
    gradient the centred RMSNorm gradient, and b adds db and sum(g).
    """
    generate_vmap_rule = True

    @staticmethod
    @_or_stored
    def forward(x, weight, bias, eps):
        y, n, r = RMSNormFunction.forward(_center(x), weight, eps)
        return y + bias, n, r

    @staticmethod
    def setup_context(ctx, inputs, output):
        RMSNormFunction.setup_context(ctx, inputs, output)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _):
        dy = RMSNormFunction.jvp(ctx, None if dx is None else _center(dx), dweight, None)[0]
        if dbias is not None:
            dy = dbias.expand_as(ctx.saved_tensors[0]).clone() if dy is None else dy.add_(dbias)
        return dy, None, None

    @staticmethod
    def backward(ctx, g, *_):
        if g is None:
            return None, None, None, None
        gx, gw, _ = RMSNormFunction.backward(ctx, g)
        gb = g.flatten(0, -2).sum(0) if ctx.needs_input_grad[2] else None
        return None if gx is None else _center(gx), gw, gb, None


class RotaryFunction(torch.autograd.Function):
    """Rotate pairs (x1, x2) of the last dimension by each position's angle.

    A linear map R: the tangent is R dx and the gradient Rᵀ g, the rotation
    by the opposite angle. As a Function, the tangent needs no help from
    autograd's zero tangents of the cos and sin tables.
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs[1:])

    @staticmethod
    def jvp(ctx, dx, *_):
        return RotaryFunction.forward(dx, *ctx.saved_tensors)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None
        cos, sin = ctx.saved_tensors
        return RotaryFunction.forward(g, cos, -sin), None, None


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(a) ⊙ b, silu(a) = a σ(a), silu'(a) = σ(a) + silu(a)(1 - σ(a)).

    Tangent silu'(a) ⊙ b ⊙ da + silu(a) ⊙ db; gradients g ⊙ silu'(a) ⊙ b and
    g ⊙ silu(a). When jvp ran (GN), backward reuses the two factors it left.
    """
    generate_vmap_rule = True

    @staticmethod
    @_or_stored
    def forward(a, b):
        return F.silu(a) * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    @staticmethod
    def _factors(a, b):
        """(silu'(a) ⊙ b, silu(a))."""
        s = torch.sigmoid(a)
        silu = a * s
        return (s + silu * (1 - s)) * b, silu

    @staticmethod
    def jvp(ctx, da, db):
        slope_b, silu = _once(ctx, SwiGLUFunction._factors)
        if da is None or db is None:
            return slope_b * da if db is None else silu * db
        return torch.addcmul(silu * db, slope_b, da)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None
        slope_b, silu = _once(ctx, SwiGLUFunction._factors, release=True)
        return g * slope_b if ctx.needs_input_grad[0] else None, g * silu if ctx.needs_input_grad[1] else None


class GELUFunction(torch.autograd.Function):
    """y = gelu(a) in the tanh approximation (the authors' flax default):
    gelu(a) = a s, s = (1 + t)/2, t = tanh(u), u = √(2/π)(a + 0.044715 a³),
    gelu'(a) = s + a (1 - t²) u'(a)/2.

    Tangent gelu'(a) ⊙ da, gradient g ⊙ gelu'(a). When jvp ran (GN),
    backward reuses the slope it left.
    """
    generate_vmap_rule = True

    @staticmethod
    @_or_stored
    def forward(a):
        return F.gelu(a, approximate="tanh")

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    @staticmethod
    def _slope(a):
        """gelu'(a)."""
        c, k = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(c * (a + k * a ** 3))
        return (1 + t) / 2 + a * (1 - t * t) * c * (1 + 3 * k * a * a) / 2

    @staticmethod
    def jvp(ctx, da):
        return _once(ctx, GELUFunction._slope) * da

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None
        return g * _once(ctx, GELUFunction._slope, release=True)


def _sum_of_products(pairs, scale=1.0):
    """scale · Σ a @ b over the pairs where both exist (3-d batches); None if none does."""
    out = None
    for a, b in pairs:
        if a is not None and b is not None:
            out = torch.bmm(a, b).mul_(scale) if out is None else out.baddbmm_(a, b, alpha=scale)
    return out


class CausalAttentionFunction(torch.autograd.Function):
    """y = P V with P = softmax(S), S = QKᵀ/√d masked to the past.

    With the probabilities P materialized (the price of forward mode; they
    are the second, non-differentiable output), the softmax Jacobian gives the
    tangent dy = (P ⊙ dS) V - rowsum(P ⊙ dS) ⊙ y + P dV, dS = (dQ Kᵀ + Q dKᵀ)/√d,
    and the gradient g_S = P ⊙ (g Vᵀ - rowsum(g ⊙ y))/√d. Masked entries of P
    are exactly 0, so no mask is needed after the softmax. Inside, the batch
    and head dimensions are flattened so that sums of products fuse (baddbmm).

    The last input, `reuse` (GPTConfig.attention_backward), chooses the
    backward. True: it reuses P with the formula above, two batched products
    more and no softmax, but P (T×T per head and layer) stays alive from the
    forward to the backward, and in a `SharedPrimals` store across all of a
    micro-batch's block passes. False: only q, k and v are kept and SDPA's
    backward recomputes what it needs, as in training. On a CPU the reuse is
    faster; on CUDA SDPA's fused backward is, and keeping P would cost
    gigabytes at T = 1024: the default ("auto") differs by device.
    """
    generate_vmap_rule = True

    @staticmethod
    def reuses_probabilities(attention_backward, device):
        """The `reuse` input for GPTConfig.attention_backward on device: "auto" reuses P on a CPU only."""
        if attention_backward == "auto":
            return device.type == "cpu"
        return attention_backward == "reuse"

    @staticmethod
    @_or_stored
    def forward(q, k, v, reuse):
        T = q.shape[-2]
        future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        q3, k3 = q.flatten(0, -3), k.flatten(0, -3)
        P = torch.baddbmm(future, q3, k3.transpose(1, 2), alpha=q.shape[-1] ** -0.5).softmax(-1)
        return (P @ v.flatten(0, -3)).view_as(v), P

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        q, k, v = (t.detach() for t in inputs[:3])
        flat = [t.flatten(0, -3) for t in (q, k, v, output[0].detach())] + [output[1].detach()]
        ctx.save_for_forward(*flat)  # jvp runs right away, then lets these go
        ctx.reuse = inputs[3]
        ctx.save_for_backward(*flat if ctx.reuse else (q, k, v))

    @staticmethod
    def jvp(ctx, dq, dk, dv, _):
        q, k, v, y, P = ctx.saved_tensors
        shape = (dq if dq is not None else dk if dk is not None else dv).shape
        dq, dk, dv = (None if t is None else t.flatten(0, -3) for t in (dq, dk, dv))
        dS = _sum_of_products([(dq, k.transpose(1, 2)), (q, None if dk is None else dk.transpose(1, 2))],
                              q.shape[-1] ** -0.5)
        dy = _sum_of_products([(P, dv)])
        if dS is not None:
            W = P * dS
            dy = W @ v if dy is None else dy.baddbmm_(W, v)
            dy.addcmul_(W.sum(-1, keepdim=True), y, value=-1)
        return dy.view(shape), None

    @staticmethod
    def backward(ctx, g, _):
        if g is None:
            return None, None, None, None
        if not ctx.reuse:  # P was not kept: SDPA recomputes
            with torch.enable_grad():
                qkv = [t.detach().requires_grad_() for t in ctx.saved_tensors]
                y = F.scaled_dot_product_attention(*qkv, is_causal=True)
            return *torch.autograd.grad(y, qkv, g), None
        q, k, v, y, P = ctx.saved_tensors
        shape, g = g.shape, g.flatten(0, -3)
        scale = q.shape[-1] ** -0.5
        gS = P * torch.baddbmm(torch.linalg.vecdot(g, y).unsqueeze(-1).mul_(-scale), g, v.transpose(1, 2), alpha=scale)
        return (gS @ k).view(shape), (gS.transpose(1, 2) @ q).view(shape), (P.transpose(1, 2) @ g).view(shape), None


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return apply_kernel(self, RMSNormFunction, x, self.weight, self.eps)[0]


class LayerNorm(RMSNorm):
    def __init__(self, dim, eps):
        super().__init__(dim, eps)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return apply_kernel(self, LayerNormFunction, x, self.weight, self.bias, self.eps)[0]


def rotary_tables(head_dim, length, base):
    """cos and sin of the rotary angles, shaped (length, head_dim // 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos(), angles.sin()



class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.fused = config.qkv == "fused"
        if self.fused:
            self.qkv = Linear(C, 3 * C)
        else:
            self.q, self.k, self.v = Linear(C, C), Linear(C, C), Linear(C, C)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm, self.k_norm = LayerNorm(C, config.norm_eps), LayerNorm(C, config.norm_eps)
        self.proj = Linear(C, C)
        self.attention_backward = config.attention_backward

    def _qkv(self, x):
        """Queries, keys and values side by side, (B, T, 3C)."""
        if self.fused:
            return self.qkv(x)
        q, k = self.q(x), self.k(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return torch.cat((q, k, self.v(x)), dim=-1)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        qkv = self._qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = RotaryFunction.apply(qkv[:2], cos, sin)  # queries and keys in one go
        v = qkv[2]
        if any(has_tangent(t) for t in (q, k, v)):
            reuse = CausalAttentionFunction.reuses_probabilities(self.attention_backward, q.device)
            # Unless the backward reuses them, the probabilities (T×T per head) are not kept past the pass: not shared.
            y = apply_kernel(self, CausalAttentionFunction, q, k, v, reuse, share=reuse)[0]
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = Linear(config.n_embd, config.mlp_hidden)
        self.up = Linear(config.n_embd, config.mlp_hidden)
        self.down = Linear(config.mlp_hidden, config.n_embd)

    def forward(self, x):
        return self.down(apply_kernel(self, SwiGLUFunction, self.gate(x), self.up(x)))


class GELUMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up = Linear(config.n_embd, config.mlp_hidden)
        self.down = Linear(config.mlp_hidden, config.n_embd)

    def forward(self, x):
        return self.down(apply_kernel(self, GELUFunction, self.up(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else GELUMLP(config)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.head = Linear(config.n_embd, config.vocab_size)
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_base)
        # Not persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        self.apply(self._init_weights)
        if config.init == "gpt2":
            # Residual projections scaled down so the residual stream's variance
            # does not grow with depth (GPT-2's rule).
            for name, p in self.named_parameters():
                if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        fan_in = self.config.init == "fan_in"
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5 if fan_in else 0.02)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0 if fan_in else 0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def gn_blocks(self):
        """Layerwise GN's blocks, in forward order: (name, parameter names).

        The embedding, each transformer block (the last one also owns the final
        norm), the output head. Block i's input is `block_inputs(idx)[i]`.
        """
        blocks = [("embed", ["embed.weight"])]
        for i, block in enumerate(self.blocks):
            names = [f"blocks.{i}.{n}" for n, _ in block.named_parameters()]
            if i == len(self.blocks) - 1:
                names.append("norm.weight")
            blocks.append((f"block{i}", names))
        blocks.append(("head", ["head.weight"]))
        return blocks

    def _rotary(self, T, dtype):
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}")
        return self.rope_cos[:T].to(dtype), self.rope_sin[:T].to(dtype)

    def forward(self, h, start_block=0, inputs=None):
        """Logits for token indices h (B, T), or from the input of a GN block.

        start_block 0: h holds token indices; 1..n_layer: h is the residual
        stream entering transformer block start_block-1; n_layer+1: h is the
        normalized final hidden state entering the head. Layerwise GN uses the
        later entries on cached `block_inputs` so it never reruns lower blocks.
        inputs: a list that receives the input of every transformer block that
        runs and of the head (primal values, detached), so that one pass also
        yields the cache.
        """
        def record(t):
            if inputs is not None:
                inputs.append(forward_ad.unpack_dual(t).primal.detach())
            return t

        if start_block == 0:
            h = self.embed(h)
        if start_block <= len(self.blocks):
            cos, sin = self._rotary(h.shape[1], h.dtype)
            for block in self.blocks[max(start_block - 1, 0):]:
                h = block(record(h), cos, sin)
            h = record(self.norm(h))
        return self.head(h)

    def shared_primals(self):
        """A store with which GN's block passes on one micro-batch share their primals (`SharedPrimals`)."""
        return SharedPrimals()

    @torch.no_grad()
    def block_inputs(self, idx):
        """The input of every GN block for tokens idx, as `forward(h, start_block=i)` takes them."""
        inputs = [idx]
        self(idx, inputs=inputs)
        return inputs

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens continuations of idx (B, T), one token at a time."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits = self(context)[:, -1, :].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = logits.softmax(dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx
