"""Gauss-Newton (GN) optimization, full and layerwise, as in Abreu et al. 2025,
"The Potential of Second-Order Optimization for LLMs: A Study with Full
Gauss-Newton" (arXiv 2510.09378).

Read this file top to bottom:

1. The loss in output space. A network maps parameters θ to outputs z = f(θ)
   (the logits); the loss ℓ(z) is cheap and its derivatives in z have closed
   forms: the gradient g_z and the Hessian-vector product H_z u.

2. The quadratic model. Around θ0 the GN model of the loss in the update Δ is

       Q(Δ) = ℓ(z0) + g_zᵀ (JΔ) + ½ (JΔ)ᵀ H_z (JΔ),      J = ∂f/∂θ at θ0,

   the second-order Taylor expansion of ℓ(z0 + JΔ), i.e. of the loss of the
   *linearized* network. Its curvature G = Jᵀ H_z J is the GN matrix: PSD for
   convex losses, and never formed. Its gradient

       ∇Q(Δ) = Jᵀ (g_z + H_z JΔ)

   costs one forward pass carrying the tangent Δ (which yields z0 and JΔ at
   once) and one backward pass with the output-space residual as cotangent.
   `gn_matvec` is the same computation with residual H_z J v. The prox-linear
   variant keeps the loss exact and only linearizes the network:
   ∇ℓ(z0 + JΔ) = Jᵀ ∇ℓ(z0 + JΔ).

3. The inner loop. An ordinary optimizer (Muon, AdamW, SOAP, Shampoo: the
   paper used Muon) minimizes Q with one fresh micro-batch per inner step, a
   cosine learning rate restarted every outer step and gradient clipping.
   The first inner step starts at Δ = 0, where ∇Q is the loss gradient g:
   a training step's plain forward and backward, for every block at once.
   Linear conjugate gradient on the quadratic averaged over the micro-batches
   is the classic alternative (Hessian-free optimization, Martens 2010).

4. The line search on the direction d the inner loop found, on fresh
   micro-batches. One forward pass with tangent d, over half of them, gives
   the slope gᵀd and the curvature dᵀGd of the full GN model along d, hence
   its minimizer η* = -gᵀd / dᵀGd, which one more forward pass over all of
   them verifies (Armijo, halving if needed); or the paper's grid of step
   sizes, or Armijo backtracking from 1. A step that does not lower the loss
   is rejected (η = 0).
   With one tangent per block, the same pass gives the GN model over the
   span of the layerwise block directions: one step size per block.

5. Layerwise GN splits the parameters into blocks (embedding, each
   transformer block, head; `default_blocks` finds them from the modules) and
   gives each block its own quadratic, built with that block's Jacobian
   alone: the block-diagonal of G. Full GN is the same code with one block.
   The other blocks sit at θ0 during the inner loop, so block l's input is
   the same at every inner step: a model that offers `block_inputs` and
   `start_block` lets block l start there (the embedding block's pass records
   them), and one that offers `shared_primals` computes the primal outputs,
   equal in every block's pass, once per micro-batch. Block l's tangent and
   residual still run through every layer above it: the blocks' passes
   together cost about (L + 1)/2 full-GN passes (results/README.md, "The
   cost of a step").
"""
import contextlib
import functools
import math
import re
import time
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from baselines import hidden_matrices, is_layer_stack, make_optimizer


# ---------------------------------------------------------------------------
# 1. Losses in output space: value, gradient and Hessian-vector product.
# ---------------------------------------------------------------------------

def wide(t):
    """t in at least float32: half-precision outputs are summed in float32, float64 stays."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class CrossEntropy:
    """Mean softmax cross-entropy, as `F.cross_entropy` with mean reduction.

    Outputs z have shape (..., C); targets are class indices shaped z.shape[:-1].
    Per token, with p = softmax(z) and N tokens: ∇ℓ = (p - onehot(y)) / N and
    H u = (p ⊙ u - p (pᵀu)) / N, the softmax Jacobian: PSD, no second
    differentiation needed. Targets of -100 (`F.cross_entropy`'s ignore_index,
    Hugging Face's padding label) are left out of the loss and of N.
    """

    @staticmethod
    def kept(y, dtype):
        """(index, weight): targets safe to index with, shaped (..., 1), and 1/N on kept tokens, 0 on ignored."""
        kept = (y != -100).unsqueeze(-1).to(dtype)
        return y.clamp(min=0).unsqueeze(-1), kept / kept.sum()

    @staticmethod
    def value(z, y):
        return F.cross_entropy(wide(z).reshape(-1, z.shape[-1]), y.reshape(-1))

    @staticmethod
    def grad(z, y):
        p = wide(z).softmax(-1)
        index, weight = CrossEntropy.kept(y, p.dtype)
        p.scatter_add_(-1, index, torch.full_like(p[..., :1], -1.0))
        return (p * weight).to(z.dtype)

    @staticmethod
    def hvp(z, y, u):
        p = wide(z).softmax(-1)
        pu = p * wide(u)
        return ((pu - p * pu.sum(-1, keepdim=True)) * CrossEntropy.kept(y, p.dtype)[1]).to(z.dtype)

    @staticmethod
    def quadratic(z, y, u):
        """ℓ(z), the slope ∇ℓᵀu, the curvature uᵀHu and the residual ∇ℓ + H u, from one softmax.

        With s = pᵀu per token: ∇ℓ + H u = (p ⊙ (1 + u - s) - onehot(y)) / N,
        ∇ℓᵀu = Σ(s - u_y) / N and uᵀHu = Σ(pᵀu² - s²) / N.
        """
        # In place where possible: at a 32k vocabulary every (tokens, C) tensor is large.
        u = wide(u)
        index, weight = CrossEntropy.kept(y, u.dtype)
        p = z.log_softmax(-1, dtype=u.dtype)
        value = -(p.gather(-1, index) * weight).sum()
        p.exp_()
        pu = p * u
        s = pu.sum(-1, keepdim=True)
        slope = ((s - u.gather(-1, index)) * weight).sum()
        curvature = ((torch.linalg.vecdot(pu, u).unsqueeze(-1) - s.pow(2)) * weight).sum()
        residual = pu.add_(p).addcmul_(p, s, value=-1)
        residual.scatter_add_(-1, index, torch.full_like(s, -1.0))
        return value, slope, curvature, residual.mul_(weight).to(z.dtype)


class MeanSquaredError:
    """Mean squared error, as `F.mse_loss` with mean reduction: H = 2/M · I."""

    @staticmethod
    def value(z, y):
        return F.mse_loss(wide(z), wide(y))

    @staticmethod
    def grad(z, y):
        return 2 * (z - y) / z.numel()

    @staticmethod
    def hvp(z, y, u):
        return 2 * u / z.numel()

    @staticmethod
    def quadratic(z, y, u):
        """ℓ(z), the slope ∇ℓᵀu, the curvature uᵀHu and the residual ∇ℓ + H u."""
        g, hu = MeanSquaredError.grad(z, y), MeanSquaredError.hvp(z, y, u)
        return MeanSquaredError.value(z, y), wide(g * u).sum(), wide(hu * u).sum(), g + hu


LOSSES = {"ce": CrossEntropy, "mse": MeanSquaredError}


def get_loss(name):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


# ---------------------------------------------------------------------------
# 2. One forward pass with a tangent, one backward pass with a residual.
# ---------------------------------------------------------------------------

@functools.cache
def load_jvp_decompositions():
    """forward_ad.make_dual imports torch's jvp decompositions on first use, which warn that
    torch.jit.script is deprecated; GN never uses them (forward mode through backward ops): import
    them once here, with that warning silenced."""
    with warnings.catch_warnings(), contextlib.suppress(ImportError):
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script")
        import torch._decomp.decompositions_for_jvp  # noqa: F401


@contextlib.contextmanager
def tangent_pass():
    """The context of every forward pass that carries a tangent (forward-mode AD).

    `F.scaled_dot_product_attention` has a forward-mode derivative only in its
    math backend, nn.MultiheadAttention's fused inference path none: these
    passes use the former, not the latter (passes without a tangent keep the
    fast kernels). Another op without one gets an error that names it.
    """
    load_jvp_decompositions()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except NotImplementedError as e:
        op = re.search(r"forward AD with (\S+)", str(e))
        if op is None and "forward mode AD" not in str(e):
            raise
        op = op.group(1) if op else "a custom autograd.Function without a jvp"
        raise NotImplementedError(
            f"GN carries a tangent through the model (forward-mode AD), and {op} has no forward-mode "
            "derivative in PyTorch: compute it with plain PyTorch ops, or wrap it in a torch.autograd.Function "
            "with a jvp, as model.py does for its kernels") from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def jvp_vjp(f, params, tangent, residual):
    """Return z = f(params), J·tangent and Jᵀ·residual(z, J·tangent).

    A single forward pass carries the tangent (forward-mode AD, in `tangent_pass`)
    while ordinary autograd records the primal computation, so the VJP needs no
    second forward.
    `residual` maps (z, Jt) to the output-space cotangent. A tangent of None
    stands for zero: a plain forward pass, and Jt is None.
    """
    primals = {k: p.detach().requires_grad_() for k, p in params.items()}
    with torch.enable_grad(), forward_ad.dual_level(), tangent_pass() if tangent is not None else contextlib.nullcontext():
        if tangent is None:
            z, jt = f(primals), None
        else:
            z, jt = forward_ad.unpack_dual(f({k: forward_ad.make_dual(p, tangent[k]) for k, p in primals.items()}))
    z_value, jt = z.detach(), None if jt is None else jt.detach()
    grads = torch.autograd.grad(z, list(primals.values()), grad_outputs=residual(z_value, jt))
    return z_value, jt, dict(zip(primals, grads))


def gn_matvec(f, params, v, targets, loss="ce"):
    """G v with G = Jᵀ H_z J at `params`: the Gauss-Newton matrix times v.

    f maps a dict of tensors to the outputs; v is a dict shaped like params.
    """
    H = get_loss(loss)
    return jvp_vjp(f, params, v, lambda z, jv: H.hvp(z, targets, jv))[2]


def model_gradient(f, params, delta, targets, loss="ce", prox_linear=False):
    """Gradient in Δ of the GN quadratic Q(Δ) (or the prox-linear ℓ(z0 + JΔ)).

    Returns (gradient dict, Q(Δ) - ℓ(z0), ℓ(z0)). The quadratic's output-space
    residual is g_z + H_z JΔ; the prox-linear one is ∇ℓ(z0 + JΔ). At Δ = 0
    (delta None) both are g_z, so the gradient is the loss's own: one plain
    forward and backward, as in a training step.
    """
    H = get_loss(loss)
    values = {}

    def residual(z, jd):
        if jd is None:
            values["loss0"], values["change"] = H.value(z, targets), torch.zeros((), device=z.device)
            return H.grad(z, targets)
        if prox_linear:
            values["loss0"] = H.value(z, targets)
            values["change"] = H.value(z + jd, targets) - values["loss0"]
            return H.grad(z + jd, targets)
        values["loss0"], slope, curvature, r = H.quadratic(z, targets, jd)
        values["change"] = slope + 0.5 * curvature
        return r

    grad = jvp_vjp(f, params, delta, residual)[2]
    return grad, values["change"], values["loss0"]


# ---------------------------------------------------------------------------
# 3. Small helpers over dicts of tensors (one dict per block).
# ---------------------------------------------------------------------------

def all_reduce_mean(tensors):
    """Average tensors in place over data-parallel ranks; a no-op in one process.

    Under torchrun every rank holds an equal share of each micro-batch, so the
    mean of the ranks' inner gradients and losses is the global batch's.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)
            t.div_(dist.get_world_size())
    return tensors


def dot(a, b):
    return sum((wide(a[k]) * wide(b[k])).sum() for k in a)


def axpy(alpha, x, y):
    """y + alpha·x, as a new dict."""
    return {k: y[k] + alpha * x[k] for k in y}


def cosine_factor(k, n):
    """Cosine decay from 1 towards 0 over n inner steps, restarted every outer step."""
    return 0.5 * (1 + math.cos(math.pi * k / n))


# ---------------------------------------------------------------------------
# 4. Line search along the direction d.
# ---------------------------------------------------------------------------

LINE_SEARCHES = ("model", "grid", "backtracking", "none", "paper")


def step_size_grid(smallest):
    """The paper's grid {1, 2^-1/2, ..., 2^-2}, then whole powers of 2 down to `smallest`.

    Every point costs a forward pass over the line-search batches, so below
    the paper's range the grid thins out.
    """
    paper = [2 ** (-k / 2) for k in range(5)]
    return [eta for eta in paper if eta >= smallest] + [2.0 ** -k for k in range(3, 64) if 2.0 ** -k >= smallest]


def forward_jvp(f, params, tangent):
    """z = f(params) and J·tangent from one forward pass carrying the tangent; no graph."""
    with torch.no_grad(), forward_ad.dual_level(), tangent_pass():
        z, jt = forward_ad.unpack_dual(f({k: forward_ad.make_dual(p, tangent[k]) for k, p in params.items()}))
    return z, jt


@torch.no_grad()
def span_model(functions, params, directions, ls_batches, H):
    """Loss at θ0 and the GN model over the span of directions d_1..d_n.

    functions(x) gives one f_l per direction, mapping the parameters d_l
    covers to the outputs on inputs x, every other parameter at θ0. Moving
    by Σ c_l d_l changes the model by sᵀc + ½ cᵀMc with s_l = gᵀd_l (the
    loss's exact directional derivative) and M_lm = (J d_l)ᵀ H_z (J d_m):
    one forward pass with tangent d_l per direction and batch. Returns ℓ(θ0),
    s and M averaged over the line-search batches, as float64 tensors.
    """
    n = len(directions)
    totals = 0
    for x, y in ls_batches:
        tangents = [forward_jvp(f, {k: params[k] for k in d}, d) for f, d in zip(functions(x), directions)]
        z, us = tangents[0][0], [u for _, u in tangents]
        diagonal = [torch.stack(H.quadratic(z, y, u)[:3]) for u in us]  # ℓ(θ0), s_l, M_ll
        M = torch.diag(torch.stack([q[2] for q in diagonal]))
        for m in range(1, n):  # the cross terms, from one Hessian-vector product per direction
            hu = H.hvp(z, y, us[m])
            for l in range(m):
                M[l, m] = M[m, l] = (wide(us[l]) * wide(hu)).sum()
        totals = totals + torch.cat([diagonal[0][:1], torch.stack([q[1] for q in diagonal]), M.reshape(-1)])
    totals = all_reduce_mean([totals / len(ls_batches)])[0].double().cpu()
    return totals[0].item(), totals[1:n + 1], totals[n + 1:].reshape(n, n)


def directional_model(forward, params, d, ls_batches, H):
    """ℓ(θ0), the slope gᵀd and the curvature dᵀGd of the full GN model along d.

    forward(params, x) gives the outputs. The span model of the single
    direction d: the quadratic's prediction at any step size η is
    slope·η + ½·curvature·η².
    """
    loss0, s, M = span_model(lambda x: [lambda p: forward(p, x)], params, [d], ls_batches, H)
    return loss0, s.item(), M.item()


@torch.no_grad()
def loss_at(forward, params, d, eta, ls_batches, H):
    """Mean true loss at θ0 + η d on the line-search batches."""
    moved = {k: params[k] + eta * d[k] for k in params}
    total = sum(H.value(forward(moved, x), y) for x, y in ls_batches)
    return all_reduce_mean([total / len(ls_batches)])[0].item()


def model_step_size(slope, curvature, largest=1.0):
    """η* = -gᵀd / dᵀGd, the minimizer of the GN model along d, at most `largest`.

    The model is the full network's, so for layerwise directions its curvature
    includes the cross-block terms the block solves ignored: η* sees their
    overshoot. A direction that does not descend (gᵀd ≥ 0) gets η = 0.
    """
    if slope >= 0:
        return 0.0
    if curvature <= 0:
        return largest
    return min(-slope / curvature, largest)


def span_step_sizes(s, M, largest=1.0, rtol=1e-6, sweeps=100):
    """The c in [0, largest]ⁿ that minimizes sᵀc + ½ cᵀMc: one step size per block direction.

    Where the scalar η* scales every block's step alike, c shrinks the blocks
    whose steps overlap in output space (large M_lm) more, and never reverses
    or lengthens a block's own step. The start, -M⁺s clipped to the box, is
    the answer when it lies inside; the pseudo-inverse drops the span's
    directions of negligible curvature (eigenvalues below rtol·the largest),
    along which two blocks' steps are interchangeable. Otherwise coordinate
    descent, exact along each coordinate, converges to the constrained
    minimizer (M is PSD).
    """
    c = (-torch.linalg.pinv(M, rtol=rtol, hermitian=True) @ s).clamp(0.0, largest)
    for _ in range(sweeps):
        previous = c.clone()
        for l in range(len(c)):
            if M[l, l] > 0:
                c[l] = (c[l] - (s[l] + M[l] @ c) / M[l, l]).clamp(0.0, largest)
        if torch.equal(c, previous):
            break
    return c


def line_search(forward, params, d, ls_batches, H, method, smallest, armijo_c=1e-4, model_along_d=None,
                model_batches=None):
    """Choose η for θ0 + η d, forward(params, x) giving the outputs. η = 0 (reject) when no candidate
    lowers the loss.

    model: η* of `model_step_size`, then halved until ℓ(θ0 + ηd) ≤ ℓ(θ0) + c·η·gᵀd
        (Armijo): usually one forward pass over the line-search batches, plus
        one for ℓ(θ0) over those the model did not see (see model_batches).
    grid: the lowest loss over `step_size_grid(smallest)` and η = 0.
    backtracking: halve η from 1 until the Armijo condition holds.
    none: η = 1, unless the loss there is not finite.
    Every rule above tries steps down to min(smallest, η*/2).
    paper: the authors' rule, exactly: the lowest loss over 2^(-k/2) ≥ smallest
        (k = 0, 1, ...); it always steps, unless no loss is finite.
    model_batches: the slope and curvature come from the first model_batches of
        ls_batches (default: all); ℓ(θ0), and every loss compared with it, from
        all of them (a pass with the tangent costs about three plain ones).
    model_along_d: (ℓ(θ0), slope, curvature) on the model batches when already
        known, as from a span model.
    Returns (η, loss at θ0, loss at θ0 + ηd, slope, curvature).
    """
    model_batches = model_batches or len(ls_batches)
    loss0, slope, curvature = model_along_d or directional_model(forward, params, d, ls_batches[:model_batches], H)
    if model_batches < len(ls_batches):
        rest = ls_batches[model_batches:]
        loss0 = (loss0 * model_batches + loss_at(forward, params, d, 0.0, rest, H) * len(rest)) / len(ls_batches)
    if not all(math.isfinite(v) for v in (loss0, slope, curvature)):
        return 0.0, loss0, loss0, slope, curvature
    if method == "paper":
        grid = [2 ** (-k / 2) for k in range(64) if 2 ** (-k / 2) >= smallest]
        losses = [(loss_at(forward, params, d, eta, ls_batches, H), eta) for eta in grid]
        best_loss, best_eta = min([(loss, eta) for loss, eta in losses if math.isfinite(loss)], default=(loss0, 0.0))
        return best_eta, loss0, best_loss, slope, curvature
    # Reach below the floor when the model's own step lies there: a layerwise
    # direction summed from many inner steps can overshoot by far more than
    # the number of blocks.
    eta_model = model_step_size(slope, curvature)
    smallest = min(smallest, eta_model / 2) if eta_model > 0 else smallest
    if method == "none":
        loss1 = loss_at(forward, params, d, 1.0, ls_batches, H)
        return (1.0, loss0, loss1, slope, curvature) if math.isfinite(loss1) else (0.0, loss0, loss0, slope, curvature)
    if method == "grid":
        best_eta, best_loss = 0.0, loss0
        for eta in step_size_grid(smallest):
            loss = loss_at(forward, params, d, eta, ls_batches, H)
            if math.isfinite(loss) and loss < best_loss:
                best_eta, best_loss = eta, loss
        return best_eta, loss0, best_loss, slope, curvature
    if method in ("model", "backtracking"):
        eta = eta_model if method == "model" else 1.0
        while slope < 0 and eta >= smallest:
            loss = loss_at(forward, params, d, eta, ls_batches, H)
            if math.isfinite(loss) and loss <= loss0 + armijo_c * eta * slope:
                return eta, loss0, loss, slope, curvature
            eta /= 2
        return 0.0, loss0, loss0, slope, curvature
    raise ValueError(f"unknown line search {method!r}: choose one of {', '.join(LINE_SEARCHES)}")


def next_reach(reach, eta, first_try, rho, smallest=2.0 ** -10, largest=16.0):
    """The inner loop's reach for the next outer step, from how this step's line search went.

    The reach multiplies the inner learning rate. Inner Muon takes steps of a
    set size, so the direction's length grows with the inner lr and the number
    of inner steps, while nothing ties it to the region where the quadratic
    model holds. The line search measures that region along d, and the rule
    follows the trust-region and Levenberg-Marquardt tradition (Martens 2010
    adapts damping the same way):
    - rejected (eta = 0): the model held nowhere along d; reach / 8.
    - Armijo cut the step it tried first (eta < first_try: η* for "model", 1
      for "backtracking"): the model held only that far; reach times
      eta / first_try, by at most 1/8 a step.
    - taken as tried, with a decrease of at least a quarter of what the model
      predicted (rho = actual / predicted decrease >= 1/4): the model held over
      the whole step, so the inner loop may reach further; reach x 2.
    - otherwise it stays: Armijo passed, but the model overpredicted. From
      random init a step that lowers the loss by a nat often has rho near
      1/4, and shrinking after it would stall the steps that follow.
    The result stays in [smallest, largest].
    """
    if eta <= 0:
        factor = 1 / 8
    elif eta < first_try:
        factor = max(eta / first_try, 1 / 8)
    elif rho >= 0.25:
        factor = 2.0
    else:
        factor = 1.0
    return min(max(reach * factor, smallest), largest)


# ---------------------------------------------------------------------------
# 5. The optimizer.
# ---------------------------------------------------------------------------

INNER_SOLVERS = ("muon", "adamw", "soap", "shampoo", "cg")
COMBINES = ("sum", "span")


def reach_applies(line_search, inner):
    """Whether the adaptive reach can run: a line search that tries one step first, a first-order inner solver."""
    return line_search in ("model", "backtracking") and inner != "cg"


def model_outputs(out):
    """What a model returned, as the outputs the loss sees: a tensor as it is, the `.logits` of a
    Hugging Face ModelOutput, the first of a tuple (nanoGPT's (logits, loss)). Any other model needs
    GaussNewton(outputs=...)."""
    if torch.is_tensor(out):
        return out
    if torch.is_tensor(getattr(out, "logits", None)):
        return out.logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"the model returned a {type(out).__name__}, not a tensor: give GaussNewton "
                    "outputs=, a function from what the model returns to the outputs the loss takes")


def default_blocks(model):
    """Parameter names per layerwise block: `model.gn_blocks()` where the model offers it, else one block
    per layer, found from the modules.

    The modules are walked in the order they were registered (in a standard
    network the forward order). Every layer of a stack (`is_layer_stack`: the
    transformer blocks in an nn.ModuleList) is a block; the walk descends into
    containers and into modules holding a stack, and every other module on
    the way (an embedding, the head) is a block. A tied or shared parameter
    belongs to the first block holding it (a tied head adds no block). A
    block without a matrix (a final norm) joins the block before it, or the
    first one after it.
    """
    if hasattr(model, "gn_blocks"):
        return [names for _, names in model.gn_blocks()]
    name_of, parameter = {id(p): n for n, p in model.named_parameters()}, dict(model.named_parameters())
    taken, units = set(), []

    def claim(params):
        units.append([name_of[id(p)] for p in params if id(p) in name_of and name_of[id(p)] not in taken])
        taken.update(units[-1])

    def walk(module, layers):
        for p in module.parameters(recurse=False):  # a bare table or matrix is a unit of its own
            claim([p])
        for child in module.children():
            container = isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict))
            if not layers and (container or any(is_layer_stack(m) for m in child.modules())):
                walk(child, is_layer_stack(child))
            else:
                claim(child.parameters())

    walk(model, is_layer_stack(model))
    blocks, leading = [], []
    for unit in filter(None, units):
        if any(parameter[n].ndim > 1 for n in unit):
            blocks.append(leading + unit)
            leading = []
        elif blocks:
            blocks[-1] += unit
        else:
            leading += unit
    return blocks or [leading]


def cached_block_starts(model, blocks):
    """Where each block's cached input enters, or None when blocks cannot start from cached inputs.

    A model that offers `block_inputs` and `start_block` caches the input of
    each of its own blocks (`default_blocks`). Blocks that are those, or runs
    of consecutive ones in forward order (the embedding with transformer
    block 0, say), start at the input of their first: its index is returned.
    """
    if not (hasattr(model, "block_inputs") and hasattr(model, "gn_blocks")):
        return None
    own, starts, i = default_blocks(model), [], 0
    for block in blocks:
        starts.append(i)
        run = []
        while i < len(own) and len(run) < len(block):
            run, i = run + own[i], i + 1
        if sorted(run) != sorted(block):
            return None
    return starts


class GaussNewton(torch.optim.Optimizer):
    """Gauss-Newton preconditioning with an inner optimizer, full or layerwise.

    Every outer `step(batches, ls_batches)` builds GN quadratic models of the
    loss around the current weights θ0 (one per block), minimizes them with
    the inner solver over `inner_steps` micro-batches, then moves the weights
    along the resulting direction by a line search on `ls_batches`.

    model: an nn.Module whose `model(x)` gives the outputs; a micro-batch's
        inputs x are a tensor, a tuple of arguments or a dict of keyword
        arguments. Any PyTorch model whose ops have forward-mode derivatives
        (stock layers and `F.scaled_dot_product_attention` do; README, "GN on
        your own model"). Every pass of a step must compute the same
        function: turn dropout off (model.eval(), or p = 0).
    outputs: a function from what the model returns to the outputs the loss
        takes (default `model_outputs`: a tensor, a Hugging Face `.logits`,
        the first of a tuple).
    mode: "layerwise" (one quadratic per block, the default and the practical
        variant) or "full" (one quadratic over all parameters: the oracle).
    loss: "ce" (targets: class indices) or "mse" (targets shaped like outputs).
    inner: "muon" (Muon on the hidden matrices, AdamW on the rest: the
        paper's; the split is by role, `baselines.hidden_matrices`),
        "adamw", "soap", "shampoo", "cg", or a callable
        (named_params, lr) -> torch.optim.Optimizer.
    inner_lr: the inner optimizer's learning rate (param_groups[0]["lr"], so
        an outer schedule can scale it); inner_steps: inner steps per outer
        step (default: one per micro-batch; CG: iterations over all of them).
    inner_schedule: "cosine" (restarted every outer step) or "constant".
    clip: max gradient norm of each block's inner gradient (None: no clip).
    prox_linear: minimize ℓ(z0 + JΔ) instead of its quadratic model.
    line_search: "model" (the full GN model's own step, verified by the true
        loss: one forward pass instead of the grid's five or more, and never
        a step that raises the loss; results/README.md, "Earlier studies"),
        "grid", "backtracking", "none" or "paper" (the authors' rule: the
        grid's best, always a step; see `line_search`).
        min_step_size: the smallest step tried (below it only when η* lies
        lower, never for "paper"; the sum of layerwise block steps overshoots:
        the step often has to be about 1/number of blocks).
        ls_model_fraction: the share of the line-search batches that η*'s
        slope and curvature come from (the span model's too); the losses the
        step is checked with come from all. Half cuts the line search by a
        quarter at no measured cost in steps (results/README.md).
    adaptive_reach: scale the inner learning rate by a reach that each outer
        step's line search sets for the next (`next_reach`); the line search
        then also halves below min_step_size, down to 2^-10, before it
        rejects. None (default): on wherever it applies (line_search "model"
        or "backtracking", a first-order inner solver); False: the inner lr
        follows its schedule alone (results/README.md, "Robust defaults").
    damping: λ, adds λ/2‖Δ‖² to each quadratic.
    warm_start: keep the inner optimizers' state across outer steps.
    keep_iterate: also keep the inner iterate where the last inner loop ended
        (the paper's code does; it drifts whenever the line search picks η < 1,
        since θ then moved only ηd).
    blocks: lists of parameter names (layerwise mode). Default: `default_blocks`,
        one block per layer. Runs of consecutive default blocks still start
        from cached inputs (`cached_block_starts`).
    combine: how layerwise GN joins its block directions d_l before the line
        search. "sum": d = Σ d_l, one step size for all. "span": d = Σ c_l d_l
        with the c that minimize the full GN model over the span of the d_l
        (`span_step_sizes`, which sees the cross-block curvature), at one
        forward pass with a tangent per block on the line-search batches.
    weight_decay: the inner optimizer's, applied to the iterate θ0 + Δ (as the
        paper's inner loop decays the weights themselves).

    A step whose inner gradients, quadratic or line-search losses are not
    finite is rejected: θ0 stays, the inner state is cleared and the inner
    learning rate is halved from then on (`lr_backoff`). Under torch.distributed
    each rank passes its share of every micro-batch; inner gradients and
    line-search losses are averaged over the ranks, so all ranks take the same step.
    """

    def __init__(self, model, mode="layerwise", loss="ce", inner="muon", inner_steps=None,
                 inner_lr=0.01, inner_schedule="cosine", weight_decay=0.0, clip=1.0,
                 prox_linear=False, line_search="model", min_step_size=None, ls_model_fraction=0.5,
                 damping=0.0, warm_start=True, keep_iterate=False, blocks=None, combine="sum", cg_tol=1e-10,
                 adaptive_reach=None, outputs=model_outputs):
        if mode not in ("layerwise", "full"):
            raise ValueError(f"unknown mode {mode!r}: choose layerwise or full")
        if isinstance(inner, str) and inner not in INNER_SOLVERS:
            raise ValueError(f"unknown inner solver {inner!r}: choose one of {', '.join(INNER_SOLVERS)}")
        if inner == "cg" and prox_linear:
            raise ValueError("the cg inner solver needs the quadratic model: it cannot run prox_linear")
        if line_search not in LINE_SEARCHES:
            raise ValueError(f"unknown line search {line_search!r}: choose one of {', '.join(LINE_SEARCHES)}")
        if combine not in COMBINES:
            raise ValueError(f"unknown combine {combine!r}: choose one of {', '.join(COMBINES)}")
        if not 0 < ls_model_fraction <= 1:
            raise ValueError(f"ls_model_fraction must be in (0, 1], got {ls_model_fraction}")
        applies = reach_applies(line_search, inner)
        if adaptive_reach and not applies:
            raise ValueError("adaptive_reach needs line_search 'model' or 'backtracking' and a first-order inner solver")
        if inner_schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown inner schedule {inner_schedule!r}: choose cosine or constant")
        self.model, self.mode, self.loss, self.inner, self.outputs = model, mode, loss, inner, outputs
        self.H = get_loss(loss)
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}  # frozen ones stay
        self.hidden = hidden_matrices(model)
        super().__init__(list(self.named.values()), dict(lr=inner_lr))
        self.inner_steps, self.inner_schedule, self.weight_decay, self.clip = inner_steps, inner_schedule, weight_decay, clip
        self.prox_linear, self.line_search, self.damping, self.cg_tol = prox_linear, line_search, damping, cg_tol
        self.ls_model_fraction = ls_model_fraction
        self.warm_start, self.keep_iterate, self.combine = warm_start, keep_iterate, combine
        self.adaptive_reach = applies if adaptive_reach is None else adaptive_reach

        if mode == "full":
            blocks = [list(self.named)]
        elif blocks is None:
            blocks = [b for b in ([n for n in block if n in self.named] for block in default_blocks(model)) if b]
        flat = [n for b in blocks for n in b]
        if sorted(flat) != sorted(self.named):
            raise ValueError("blocks must list every trainable parameter of the model exactly once")
        self.blocks = [list(b) for b in blocks]
        self.block_starts = cached_block_starts(model, self.blocks) if mode == "layerwise" else None
        self.cached_inputs = self.block_starts is not None
        if min_step_size is None:
            min_step_size = 0.25 if len(self.blocks) == 1 else 2.0 ** -math.ceil(math.log2(4 * len(self.blocks)))
        self.min_step_size = min_step_size

        # The inner iterate θ0 + Δ, one tensor per parameter; the inner optimizers move it.
        self.iterate = {n: p.detach().clone() for n, p in self.named.items()}
        self.inner_opts = [self._make_inner({n: self.iterate[n] for n in b}) for b in self.blocks]
        self.outer_steps = 0
        self.lr_backoff = 1.0  # halved after every non-finite inner loop
        self.reach = 1.0  # the inner lr's factor that `next_reach` sets (adaptive_reach)

    def _make_inner(self, named):
        if self.inner == "cg":
            return None
        lr = self.param_groups[0]["lr"]
        if callable(self.inner):
            opt = self.inner(list(named.items()), lr)
        else:
            hidden = {"hidden": self.hidden} if self.inner == "muon" else {}
            opt = make_optimizer(self.inner, list(named.items()), lr=lr, weight_decay=self.weight_decay, **hidden)
        for group in opt.param_groups:  # the schedule scales every group's own lr
            group["lr_ratio"] = group["lr"] / lr
        return opt

    def _forward(self, params, x, **kwargs):
        """The outputs at params (missing ones at the model's own values) for inputs x: a tensor, a tuple
        of positional arguments or a dict of keyword arguments."""
        args, kw = ((), x) if isinstance(x, Mapping) else (x, {}) if isinstance(x, tuple) else ((x,), {})
        return self.outputs(functional_call(self.model, params, args, {**kw, **kwargs}))

    def _block_functions(self, x):
        """f_l: block l's parameters -> outputs, with every other block at θ0.

        Every f_l runs the network at θ0 and differs only in its tangent: with
        a model that offers `shared_primals`, the functions for one x compute
        each layer's primal output once between them.
        """
        model = self.model
        several = len(self.blocks) > 1
        shared = model.shared_primals() if several and hasattr(model, "shared_primals") else contextlib.nullcontext()

        def run(p, x, **kwargs):
            with shared:
                return self._forward(p, x, **kwargs)

        if self.cached_inputs:
            # The embedding block's pass runs the whole network and records the
            # input of every later block on its way; the blocks run in order,
            # so each later block starts from its recorded input.
            inputs = [x]
            return [lambda p: run(p, x, inputs=inputs)] + [
                lambda p, i=i: run(p, inputs[i], start_block=i) for i in self.block_starts[1:]]
        return [lambda p: run(p, x)] * len(self.blocks)

    def _block_params(self, block):
        return {n: self.named[n].detach() for n in block}

    def _delta(self, block):
        return {n: self.iterate[n] - self.named[n].detach() for n in block}

    def _model_gradient(self, f, block, delta, y):
        """∇ of block's damped quadratic (or prox-linear model) at delta."""
        grad = model_gradient(f, self._block_params(block), delta, y, self.loss, self.prox_linear)[0]
        return axpy(self.damping, delta, grad) if self.damping else grad

    def inner_gradients(self, x, y, at_origin=False):
        """Every block's ∇Q at the current inner iterate, on the micro-batch (x, y).

        at_origin: the iterate is θ0 (Δ = 0), where every block's ∇Q is its part
        of the loss gradient; one training step's forward and backward gives
        them all, instead of a pass with a tangent per block.
        """
        if at_origin:
            f = lambda p: self._forward(p, x)
            grad = model_gradient(f, self._block_params(list(self.named)), None, y, self.loss, self.prox_linear)[0]
            return [{n: grad[n] for n in block} for block in self.blocks]
        return [self._model_gradient(f, block, self._delta(block), y)
                for block, f in zip(self.blocks, self._block_functions(x))]

    # -- inner solvers ------------------------------------------------------

    def _first_order_inner_loop(self, batches, n_steps, stats, at_origin):
        """Each inner step: the next micro-batch, every block's ∇Q, one optimizer step."""
        lr = self.param_groups[0]["lr"] * self.lr_backoff * self.reach
        norms = []
        for k in range(n_steps):
            x, y = batches[k % len(batches)]
            factor = cosine_factor(k, n_steps) if self.inner_schedule == "cosine" else 1.0
            grads = self.inner_gradients(x, y, at_origin and k == 0)
            for block, grad, opt in zip(self.blocks, grads, self.inner_opts):
                all_reduce_mean(list(grad.values()))
                for n in block:
                    self.iterate[n].grad = grad[n]
                norms.append(torch.nn.utils.clip_grad_norm_([self.iterate[n] for n in block],
                                                            self.clip if self.clip else float("inf")))
                for group in opt.param_groups:
                    group["lr"] = group["lr_ratio"] * lr * factor
                opt.step()
        for n in self.iterate:
            self.iterate[n].grad = None
        # The norms reach the host once per loop, not once per inner step (each
        # read would stall a GPU). A non-finite norm anywhere rejects the whole
        # loop; the inner steps after it are wasted, which only a failing step pays.
        stats["inner_grad_norm"] = torch.stack(norms).tolist() if norms else []
        return all(math.isfinite(v) for v in stats["inner_grad_norm"])

    def _mean_over_batches(self, batches, fn):
        """fn(x, y), one dict per block, averaged over the micro-batches."""
        totals = None
        for x, y in batches:
            out = fn(x, y)
            totals = out if totals is None else [{k: t[k] + o[k] for k in o} for t, o in zip(totals, out)]
        means = [{k: v / len(batches) for k, v in t.items()} for t in totals]
        all_reduce_mean([v for m in means for v in m.values()])
        return means

    def _cg_inner_loop(self, batches, n_steps, stats, at_origin):
        """Linear CG on each block's damped quadratic averaged over all micro-batches.

        Every block runs its own CG (its own step sizes α, β) on the
        block-diagonal system (G_ll + λI) Δ_l = -∇Q_l(0); one pass over the
        micro-batches computes all blocks' matvecs.
        """
        def curvature(directions):
            def damped_matvecs(x, y):
                products = []
                for block, f in zip(self.blocks, self._block_functions(x)):
                    p = {n: directions[n] for n in block}
                    products.append(axpy(self.damping, p, gn_matvec(f, self._block_params(block), p, y, self.loss)))
                return products
            return self._mean_over_batches(batches, damped_matvecs)

        gradients = self._mean_over_batches(batches, lambda x, y: self.inner_gradients(x, y, at_origin))
        residuals = [{k: -v for k, v in g.items()} for g in gradients]
        directions = [dict(r) for r in residuals]
        rr = [dot(r, r) for r in residuals]
        rr0 = [max(v.item(), 1e-300) for v in rr]
        for _ in range(n_steps):
            stats["inner_grad_norm"].append(math.sqrt(sum(v.item() for v in rr)))
            if not math.isfinite(stats["inner_grad_norm"][-1]):
                return False
            active = [v.item() > self.cg_tol ** 2 * v0 for v, v0 in zip(rr, rr0)]
            if not any(active):
                break
            flat = {n: t for p in directions for n, t in p.items()}
            products = curvature(flat)
            for i, block in enumerate(self.blocks):
                pAp = dot(directions[i], products[i])
                if not active[i] or pAp <= 0:
                    continue
                alpha = rr[i] / pAp
                for n in block:
                    self.iterate[n].add_(alpha * directions[i][n])
                residuals[i] = axpy(-alpha, products[i], residuals[i])
                rr_new = dot(residuals[i], residuals[i])
                directions[i] = axpy(rr_new / rr[i], directions[i], residuals[i])
                rr[i] = rr_new
        return True

    # -- the outer step -----------------------------------------------------

    def _span_direction(self, params, d, ls_batches):
        """Σ w_l d_l with the span's proportions w = c / max(c), w, and the GN model along that sum.

        The line search then scales the sum as a whole (its η* is max(c) when
        no coefficient was clipped), so with one block this is the scalar path.
        """
        directions = [{n: d[n] for n in block} for block in self.blocks]
        loss0, s, M = span_model(self._block_functions, params, directions, ls_batches, self.H)
        if not (torch.isfinite(s).all() and torch.isfinite(M).all()):  # the line search then rejects the step
            return d, [1.0] * len(self.blocks), (loss0, float("nan"), float("nan"))
        c = span_step_sizes(s, M)
        if c.max() <= 0:  # no block descends: a zero slope makes the line search reject
            return d, [1.0] * len(self.blocks), (loss0, 0.0, 0.0)
        w = c / c.max()
        combined = {n: w[l].item() * d[n] for l, block in enumerate(self.blocks) for n in block}
        return combined, w.tolist(), (loss0, (s @ w).item(), (w @ M @ w).item())

    def step(self, batches, ls_batches=None):
        """One outer GN step. Returns a dict of statistics (see the keys below)."""
        start = time.perf_counter()
        ls_batches = ls_batches or batches
        n_steps = self.inner_steps or len(batches)
        stats = {"inner_grad_norm": []}
        # The first inner loop starts at the weights as they are now, not as __init__ saw them.
        at_origin = not self.keep_iterate or self.outer_steps == 0
        if at_origin:
            for n, p in self.named.items():
                self.iterate[n].copy_(p.detach())
        if not self.warm_start:
            for opt in self.inner_opts:
                if opt is not None:
                    opt.state.clear()

        requires_grad = {n: p.requires_grad for n, p in self.named.items()}
        for p in self.named.values():  # θ0 is a constant inside the inner loop
            p.requires_grad_(False)
        try:
            inner_loop = self._cg_inner_loop if self.inner == "cg" else self._first_order_inner_loop
            finite = inner_loop(batches, n_steps, stats, at_origin)
            params = {n: p.detach() for n, p in self.named.items()}
            d = {n: self.iterate[n] - params[n] for n in params}
            line_search_start = time.perf_counter()
            block_weights, model_along_d = [1.0] * len(self.blocks), None
            model_batches = max(1, int(len(ls_batches) * self.ls_model_fraction))
            if finite and self.combine == "span":
                d, block_weights, model_along_d = self._span_direction(params, d, ls_batches[:model_batches])
            smallest = min(self.min_step_size, 2.0 ** -10) if self.adaptive_reach else self.min_step_size
            if finite:
                eta, loss0, loss1, slope, curvature = line_search(
                    self._forward, params, d, ls_batches, self.H, self.line_search, smallest,
                    model_along_d=model_along_d, model_batches=model_batches)
            else:
                eta, loss0, loss1, slope, curvature = 0.0, float("nan"), float("nan"), float("nan"), float("nan")
            line_search_s = time.perf_counter() - line_search_start
        finally:
            for n, p in self.named.items():
                p.requires_grad_(requires_grad[n])

        with torch.no_grad():
            for n, p in self.named.items():
                if eta:
                    p.add_(d[n], alpha=eta)
                if not finite:
                    self.iterate[n].copy_(p)
        if not finite:  # no trace in the inner state, and a smaller inner lr from now on
            self.lr_backoff /= 2
            for opt in self.inner_opts:
                if opt is not None:
                    opt.state.clear()
        predicted = -(slope * eta + 0.5 * curvature * eta ** 2)
        reach = self.reach
        if self.adaptive_reach and finite:
            first_try = model_step_size(slope, curvature) if self.line_search == "model" else 1.0
            rho = (loss0 - loss1) / predicted if predicted > 0 else 0.0
            self.reach = next_reach(self.reach, eta, first_try, rho)
        self.outer_steps += 1
        return {
            "step_size": eta,
            "rejected": eta == 0.0,
            "finite": finite,
            "loss_before": loss0,
            "loss_after": loss1,
            "slope": slope,
            "curvature": curvature,
            # The full GN model's decrease along d (on the line-search batches):
            # at η = 1, and at the chosen step.
            "model_decrease": -(slope + 0.5 * curvature),
            "predicted_decrease": predicted,
            "reach": reach,
            "direction_norm": math.sqrt(dot(d, d).item()),
            "inner_grad_norm_first": stats["inner_grad_norm"][0] if stats["inner_grad_norm"] else 0.0,
            "inner_grad_norm_last": stats["inner_grad_norm"][-1] if stats["inner_grad_norm"] else 0.0,
            "block_step_sizes": [eta * w for w in block_weights],
            "time_s": time.perf_counter() - start,
            "line_search_s": line_search_s,
        }

    def state_dict(self):
        return {
            "lr": self.param_groups[0]["lr"],
            "outer_steps": self.outer_steps,
            "lr_backoff": self.lr_backoff,
            "reach": self.reach,
            "iterate": {n: t.clone() for n, t in self.iterate.items()},
            "inner": [opt.state_dict() if opt is not None else None for opt in self.inner_opts],
        }

    def load_state_dict(self, state):
        self.param_groups[0]["lr"] = state["lr"]
        self.outer_steps, self.lr_backoff = state["outer_steps"], state["lr_backoff"]
        self.reach = state.get("reach", 1.0)  # checkpoints from before adaptive_reach have none
        for n, t in state["iterate"].items():
            self.iterate[n].copy_(t)
        for opt, s in zip(self.inner_opts, state["inner"]):
            if opt is not None:
                opt.load_state_dict(s)
