"""The baseline optimizers the GN paper compares against: Muon, SOAP and Shampoo.

AdamW is torch.optim.AdamW. All three classes are torch.optim.Optimizers with
param groups and state_dict round trips; they run wherever their parameters
live (CPU or CUDA) and keep their state in float32 (float64 for float64
parameters), also for bfloat16 parameters. Weight decay is decoupled
(AdamW-style): p ← (1 − lr·wd)·p − lr·update.

The math lives in small pure functions (`newton_schulz`, `inverse_root`,
`change_basis`, ...); the classes only keep state around them.
`make_optimizer` builds any of the four from a list of (name, tensor) pairs,
which is how train.py and gn.py ask for them.
"""
from itertools import chain

import torch

# ---------------------------------------------------------------------------
# The math


def newton_schulz(G, steps=5, eps=1e-7):
    """Approximately orthogonalize G: U Vᵀ for G = U S Vᵀ, up to a spread in S.

    Muon's quintic Newton-Schulz iteration (Jordan et al. 2024). Dividing by
    the Frobenius norm puts every singular value in (0, 1]; each step applies
    p(s) = a·s + b·s³ + c·s⁵ to them. The coefficients trade exact convergence
    for a steep slope at zero, so five steps pull even small singular values up
    into a band around 1 (about 0.7 to 1.2) instead of converging to exactly 1,
    which does not hurt training. Works on the last two dimensions, in G's dtype
    (use float32 or wider: the momentum buffers fed to it are).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G  # iterate on the smaller Gram matrix X Xᵀ
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # one batch dimension, for baddbmm
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        # The sums ride inside the products (b·A + c·A², then a·X + (...)·X):
        # no separate passes for the scalings and additions, which at small
        # widths cost a noticeable share of the products themselves.
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    X = X.reshape(shape)
    return X.mT if tall else X


def ema_(average, x, beta, step):
    """average ← beta·average + (1 − beta)·x in place; return it bias-corrected
    (divided by 1 − beta^step), as Adam does for averages started at zero."""
    average.lerp_(x, 1 - beta)
    return average / (1 - beta**step)


def gram(G, dim):
    """G times itself contracted over every dimension but `dim`: G Gᵀ for dim 0,
    Gᵀ G for dim 1. Shampoo's and SOAP's Kronecker factor statistics."""
    A = G.movedim(dim, 0).reshape(G.shape[dim], -1)
    return A @ A.mT


def change_basis(X, bases, inverse=False):
    """Q_Lᵀ X Q_R for bases (Q_L, Q_R), or Q_L X Q_Rᵀ with inverse=True.

    A None basis leaves that dimension as it is (identity); an empty list of
    bases (1-D tensors) returns X. With symmetric matrices in place of the
    bases this is also Shampoo's two-sided preconditioning L^(-1/4) X R^(-1/4).
    """
    for dim, Q in enumerate(bases):
        if Q is not None:
            X = (X.movedim(dim, -1) @ (Q.mT if inverse else Q)).movedim(-1, dim)
    return X


def eigenvectors(M):
    """Eigenvectors of the symmetric matrix M, by decreasing eigenvalue.

    Computed in float64: near-degenerate eigenvalues of gradient statistics
    make float32 eigh inaccurate, and the matrices are small."""
    return torch.linalg.eigh(M.double()).eigenvectors.flip(-1).to(M.dtype)


def inverse_root(M, p, eps):
    """M^(-1/p) for a symmetric positive semi-definite M, via eigh in float64.

    eps is relative: eps·λ_max is added to every eigenvalue (as distributed
    Shampoo's relative epsilon does), which keeps the root of near-null
    directions bounded whatever the gradients' scale."""
    eigenvalues, Q = torch.linalg.eigh(M.double())
    damping = eps * eigenvalues.max().clamp(min=1e-30)  # clamp: M may be all zeros
    roots = (eigenvalues.clamp(min=0) + damping).pow(-1.0 / p)
    return ((Q * roots) @ Q.mT).to(M.dtype)


def as_matrix(grad):
    """The 2-D view the preconditioners work on: (dim 0, all other dims), or
    the tensor itself when it has fewer than two dimensions."""
    return grad.reshape(grad.shape[0], -1) if grad.ndim >= 2 else grad


# ---------------------------------------------------------------------------
# The optimizers


class _Optimizer(torch.optim.Optimizer):
    """Plumbing shared by the three optimizers; subclasses define `_direction`.

    `step` hands each gradient, in the state's precision, to `_direction` and
    applies the returned update with decoupled weight decay, rounding into the
    parameter once. `load_state_dict` keeps the state's own precision: torch
    would cast every floating tensor to its parameter's dtype, which for
    bfloat16 parameters would throw away the float32 moments and factors.
    """

    def _direction(self, grad, state, group):
        """The update for one parameter (the step is -lr times it), or None to
        skip the parameter this step. grad may alias p.grad: do not modify it."""
        raise NotImplementedError

    def _directions(self, grads, states, group):
        """The updates for a group's parameters: one `_direction` each, unless
        a subclass treats them together."""
        return [self._direction(grad, state, group) for grad, state in zip(grads, states)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad.to(torch.promote_types(p.dtype, torch.float32)) for p in params]
            moved = [(p, update.reshape(p.shape)) for p, update in
                     zip(params, self._directions(grads, [self.state[p] for p in params], group)) if update is not None]
            if moved:
                # p·(1 − lr·wd) − lr·update in the update's precision, rounded into p once; the
                # _foreach_ ops take the group at once (per-tensor calls cost more than the
                # arithmetic at small widths, and GN's inner loop steps once per micro-batch).
                new = torch._foreach_mul([p.to(update.dtype) for p, update in moved], 1 - lr * weight_decay)
                torch._foreach_sub_(new, torch._foreach_mul([update for _, update in moved], lr))
                torch._foreach_copy_([p for p, _ in moved], new)
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # Redo torch's per-parameter copy without its dtype cast, pairing saved
        # ids with parameters in order, as torch does.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                self.state[p] = _to_device(state_dict["state"][saved_id], p.device)


def _to_device(value, device):
    """value with every tensor inside it moved to device, dtypes kept."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def adamw_directions(grads, states, group):
    """AdamW's bias-corrected directions m̂ / (√v̂ + eps) for a list of gradients, updating their states.

    One _foreach_ op per stage for the whole list: at small widths the
    per-tensor calls would cost more than the arithmetic.
    """
    for grad, state in zip(grads, states):
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(grad), exp_avg_sq=torch.zeros_like(grad))
        state["step"] += 1
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    torch._foreach_lerp_(exp_avg_sq, torch._foreach_pow(grads, 2), 1 - beta2)
    denominators = torch._foreach_div(exp_avg_sq, [1 - beta2 ** s["step"] for s in states])
    torch._foreach_sqrt_(denominators)
    torch._foreach_add_(denominators, group["eps"])
    m_hat = torch._foreach_div(exp_avg, [1 - beta1 ** s["step"] for s in states])
    return torch._foreach_div(m_hat, denominators)


class Muon(_Optimizer):
    """Muon: MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024,
    https://kellerjordan.github.io/posts/muon/), with AdamW for what Muon is not for.

    For a hidden weight matrix W (rows × cols) Muon keeps SGD momentum (Nesterov
    by default) and steps along `newton_schulz(momentum)`, an approximately
    orthogonal matrix: every direction of the update gets the same size, however
    lopsided the gradient's spectrum. The step is scaled by
    max(1, rows/cols)^0.5 (Keller Jordan's reference scale), so lr is roughly
    the RMS-to-spectral change per step and ~0.02 is a good start; it is not
    AdamW's lr.

    Muon is meant for hidden 2-D matrices only. The embedding, the output head
    and 1-D gains belong in param groups with use_muon=False, which take
    AdamW steps (betas, eps) inside this same optimizer, so one state_dict holds
    everything. `split_muon_params` makes that split; `make_optimizer("muon")`
    builds both groups.

    Group options: lr=0.02, momentum=0.95, nesterov=True, ns_steps=5,
    weight_decay=0.0 (decoupled, both kinds), use_muon=True; for AdamW groups
    betas=(0.9, 0.95), eps=1e-8.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5,
                 weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, use_muon=True):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, betas=betas, eps=eps, use_muon=use_muon)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        if param_group.get("use_muon", self.defaults["use_muon"]):
            params = param_group["params"]
            shapes = [tuple(p.shape) for p in ([params] if isinstance(params, torch.Tensor) else params)]
            if any(len(shape) != 2 for shape in shapes):
                raise ValueError(f"Muon orthogonalizes 2-D matrices, got shapes {shapes}: put the others "
                                 "in a use_muon=False (AdamW) group, see split_muon_params")
        super().add_param_group(param_group)

    def _directions(self, grads, states, group):
        if not grads:
            return []
        if not group["use_muon"]:
            return adamw_directions(grads, states, group)
        for grad, state in zip(grads, states):
            if not state:
                state["momentum_buffer"] = torch.zeros_like(grad)
        buffers = [state["momentum_buffer"] for state in states]
        torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
        momenta = torch._foreach_lerp(grads, buffers, group["momentum"]) if group["nesterov"] else buffers
        # Same-shaped matrices (the layers of a transformer) share one batched
        # Newton-Schulz: fewer kernel launches on a GPU (on the CPU it measured
        # no faster than one matrix at a time).
        by_shape = {}
        for i, m in enumerate(momenta):
            by_shape.setdefault((m.shape, m.dtype, m.device), []).append(i)
        updates = [None] * len(momenta)
        for (shape, _, _), indices in by_shape.items():
            orthogonal = newton_schulz(torch.stack([momenta[i] for i in indices]), group["ns_steps"])
            for i, update in zip(indices, orthogonal * max(1, shape[0] / shape[1]) ** 0.5):
                updates[i] = update
        return updates


class SOAP(_Optimizer):
    """SOAP: ShampoO with Adam in the Preconditioner's eigenbasis (Vyas et al.
    2024, arXiv 2409.11321; reference code github.com/nikhilvyas/SOAP).

    For a matrix gradient G it keeps Shampoo's Kronecker factors as EMAs,
    L ← β·L + (1 − β)·G Gᵀ and R ← β·R + (1 − β)·Gᵀ G (β = shampoo_beta),
    and runs Adam in their eigenbases Q_L, Q_R: the first moment M is kept in
    the parameter's own coordinates and rotated at every step, the second moment
    V lives in the rotated coordinates, and the Adam step
    Q_L [(Q_Lᵀ M̂ Q_R) / (√V̂ + eps)] Q_Rᵀ is rotated back. The eigenbases are
    refreshed every `precondition_frequency` steps: the first time with eigh,
    later (as in the paper) by one power-iteration step and a QR decomposition,
    reordered by estimated eigenvalue with V's coordinates reordered to match;
    exact_eigh=True uses eigh at every refresh. A dimension larger than
    max_precond_dim gets no factor (identity basis on that side). Tensors with
    more than two dimensions are seen as (dim 0, rest) matrices. 1-D
    parameters get plain Adam, the reference code's default
    (precondition_1d=False there).

    As in the reference code, the first step only measures the gradient to
    build the first eigenbasis and does not move the parameters, and the
    factors are updated after the step, so a gradient is never projected onto
    a basis built from itself.

    Group options: lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8,
    weight_decay=0.01 (decoupled), precondition_frequency=10,
    max_precond_dim=10000, exact_eigh=False (the reference code's defaults).
    """

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8,
                 weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000, exact_eigh=False):
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        exact_eigh=exact_eigh)
        super().__init__(params, defaults)

    def _direction(self, grad, state, group):
        G = as_matrix(grad)
        first = not state
        if first:
            sides = G.shape if G.ndim == 2 else ()
            state.update(step=0, exp_avg=torch.zeros_like(G), exp_avg_sq=torch.zeros_like(G),
                         factors=[G.new_zeros(n, n) if n <= group["max_precond_dim"] else None for n in sides],
                         bases=[None] * len(sides))
            update = None
        else:
            state["step"] += 1
            beta1, beta2 = group["betas"]
            bases = state["bases"]
            m_hat = ema_(state["exp_avg"], G, beta1, state["step"])
            v_hat = ema_(state["exp_avg_sq"], change_basis(G, bases).square(), beta2, state["step"])
            update = change_basis(change_basis(m_hat, bases) / (v_hat.sqrt() + group["eps"]), bases, inverse=True)
        for dim, factor in enumerate(state["factors"]):
            if factor is not None:
                factor.lerp_(gram(G, dim), 1 - group["shampoo_beta"])
        if first:
            self._refresh_bases(state, exact=True)
        elif state["step"] % group["precondition_frequency"] == 0:
            self._refresh_bases(state, exact=group["exact_eigh"])
        return update

    @staticmethod
    def _refresh_bases(state, exact):
        """Recompute the eigenbases of the factors: by eigh if exact, else by
        one power-iteration step from the current bases and a QR decomposition."""
        for dim, factor in enumerate(state["factors"]):
            if factor is None:
                continue
            if exact:
                state["bases"][dim] = eigenvectors(factor)
                continue
            Q = state["bases"][dim]
            FQ = factor @ Q
            # Sort the columns by estimated eigenvalue, so that QR (which keeps
            # the leading columns' span) tracks the top eigenvectors, and move
            # V's coordinates with them.
            order = torch.argsort((Q * FQ).sum(0), descending=True)
            state["exp_avg_sq"] = state["exp_avg_sq"].index_select(dim, order)
            state["bases"][dim] = torch.linalg.qr(FQ[:, order]).Q


class Shampoo(_Optimizer):
    """Shampoo (Gupta et al. 2018, arXiv 1802.09568) with Adam grafting,
    momentum and infrequent inverse roots (Anil et al. 2020, arXiv 2002.09018).

    For a matrix gradient G it accumulates the Kronecker factors
    L ← factor_beta·L + G Gᵀ and R ← factor_beta·R + Gᵀ G (factor_beta=1: the
    paper's running sums; below 1: exponentially discounted sums, the same as an
    EMA up to a constant scale, which nothing below depends on). Its direction is
    L^(-1/4) G R^(-1/4), with the inverse roots recomputed every `update_freq`
    steps by eigh in float64, eps_root·λ_max added to the eigenvalues.
    The direction is grafted onto Adam: rescaled, per parameter, to the norm of
    the Adam (RMSprop) step G / (√v̂ + eps) from the same gradient, so lr means
    what Adam's does and only the direction is Shampoo's. Momentum (an EMA with
    beta1, bias-corrected) acts on the grafted step.

    Until step `start_preconditioning_step` (default: update_freq) the step is
    the Adam step itself while the factors accumulate, as distributed Shampoo
    does: roots taken from the first gradient alone come from rank-one factors,
    whose eps-damped null space is 1/eps_root^(1/4) times larger than the one
    direction the gradient spans, so most of the step would go where no
    gradient has pointed yet. The first roots are taken at that step, then
    every update_freq steps.

    A dimension larger than max_precond_dim gets no factor; with one side left
    the direction is the one-sided L^(-1/2) G or G R^(-1/2) (exponent −1/(2k)
    for k preconditioned sides). 1-D parameters, and matrices with no side
    small enough, get the Adam step itself. Tensors with more than two
    dimensions are seen as (dim 0, rest) matrices.

    Group options: lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0
    (decoupled), factor_beta=1.0, update_freq=10, max_precond_dim=10000,
    eps_root=1e-6, start_preconditioning_step=None (update_freq).
    """

    def __init__(self, params, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, factor_beta=1.0,
                 update_freq=10, max_precond_dim=10000, eps_root=1e-6, start_preconditioning_step=None):
        if start_preconditioning_step is None:
            start_preconditioning_step = update_freq
        if start_preconditioning_step < 1:
            raise ValueError(f"start_preconditioning_step must be at least 1, got {start_preconditioning_step}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, factor_beta=factor_beta,
                        update_freq=update_freq, max_precond_dim=max_precond_dim, eps_root=eps_root,
                        start_preconditioning_step=start_preconditioning_step)
        super().__init__(params, defaults)

    def _direction(self, grad, state, group):
        G = as_matrix(grad)
        if not state:
            sides = G.shape if G.ndim == 2 else ()
            state.update(step=0, exp_avg=torch.zeros_like(grad), exp_avg_sq=torch.zeros_like(grad),
                         factors=[G.new_zeros(n, n) if n <= group["max_precond_dim"] else None for n in sides],
                         roots=[None] * len(sides))
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adam_step = grad / (ema_(state["exp_avg_sq"], grad.square(), beta2, state["step"]).sqrt() + group["eps"])
        factors = state["factors"]
        n_sides = sum(factor is not None for factor in factors)
        for dim, factor in enumerate(factors):
            if factor is not None:
                factor.mul_(group["factor_beta"]).add_(gram(G, dim))
        since_start = state["step"] - group["start_preconditioning_step"]
        if n_sides == 0 or since_start < 0:
            return ema_(state["exp_avg"], adam_step, beta1, state["step"])
        if since_start % group["update_freq"] == 0:
            for dim, factor in enumerate(factors):
                if factor is not None:
                    state["roots"][dim] = inverse_root(factor, 2 * n_sides, group["eps_root"])
        direction = change_basis(G, state["roots"]).reshape(grad.shape)
        grafted = direction * (adam_step.norm() / direction.norm().clamp(min=1e-30))
        return ema_(state["exp_avg"], grafted, beta1, state["step"])


# ---------------------------------------------------------------------------
# Building them


def is_layer_stack(module):
    """A ModuleList or Sequential of two or more modules of one type, with parameters: a network's layers."""
    children = list(module.children())
    return (isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) and len(children) > 1
            and len({type(c) for c in children}) == 1 and any(True for _ in module.parameters()))


def hidden_matrices(model):
    """The names of the parameters Muon orthogonalizes, by their role in model: the 2-D parameters
    of its layers, for any architecture (gn.py's inner Muon splits by this).

    Not hidden (AdamW takes them): nn.Embedding weights and any parameter tied
    to one; the output layer's (of the last module outside the layer stacks,
    not an embedding, that holds a 2-D parameter of its own: the head,
    wherever it was registered); tables held by the model or by a module holding its
    layer stack (a bare positional table); all that is not 2-D.
    """
    name_of = {id(p): n for n, p in model.named_parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    in_layers = {id(m) for s in model.modules() if is_layer_stack(s) for layer in s.children() for m in layer.modules()}
    owners = [m for m in model.modules() if any(p.ndim == 2 for p in m.parameters(recurse=False))]
    outside = [m for m in owners if id(m) not in in_layers and not isinstance(m, torch.nn.Embedding)]
    output = {id(p) for p in outside[-1].parameters(recurse=False)} if outside else set()
    tables = {id(p) for m in model.modules() if m is model or any(is_layer_stack(c) for c in m.modules())
              for p in m.parameters(recurse=False)}
    return {name_of[id(p)] for m in owners for p in m.parameters(recurse=False)
            if p.ndim == 2 and id(p) in name_of and id(p) not in embeddings | output | tables}


def split_muon_params(named_params, hidden=None):
    """Split (name, tensor) pairs into (muon_named, adamw_named) lists.

    Muon gets the hidden matrices: the names in hidden (`hidden_matrices`
    of the model), or without it 2-D tensors whose name contains neither "embed"
    nor "head" (model.GPT's names). Everything else (embedding, output head,
    1-D gains) goes to AdamW. Works on any tensors (gn.py passes plain leaf
    tensors)."""
    muon_named, adamw_named = [], []
    for name, tensor in named_params:
        if hidden is None:
            hidden_matrix = tensor.ndim == 2 and "embed" not in name and "head" not in name
        else:
            hidden_matrix = name in hidden
        (muon_named if hidden_matrix else adamw_named).append((name, tensor))
    return muon_named, adamw_named


# Learning rates that trained the tiny preset best (100 steps of 8
# micro-batches x 16 x 64 tokens, warmup then cosine): train.py's defaults.
# compare.py sweeps around them (results/README.md, "Six optimizers at 64K").
DEFAULT_LR = {"adamw": 3e-3, "muon": 0.06, "soap": 9e-3, "shampoo": 3e-3}

# Muon's AdamW groups (embedding, head, gains) step at this fraction of Muon's
# lr unless adamw_lr is given: Muon's lr is in its own units (see Muon), and
# Keller Jordan's reference pairs lr 0.02 with AdamW at a few 1e-3.
MUON_ADAMW_LR_RATIO = 0.15

OPTIMIZERS = {"adamw": torch.optim.AdamW, "muon": Muon, "soap": SOAP, "shampoo": Shampoo}


# Adam's betas per optimizer (for Muon: its AdamW groups'). SOAP keeps its
# reference code's (0.95, 0.95); (0.9, 0.95) did no better at its best lr
# (results/README.md, "Earlier studies").
DEFAULT_BETAS = {"adamw": (0.9, 0.95), "muon": (0.9, 0.95), "soap": (0.95, 0.95), "shampoo": (0.9, 0.95)}


def make_optimizer(name, named_params, lr, weight_decay=0.0, betas=None, **kwargs):
    """Build optimizer `name` ("adamw", "muon", "soap" or "shampoo") for a list
    of (name, tensor) pairs. betas are Adam's (default: DEFAULT_BETAS[name]).
    Extra keyword arguments go to the optimizer's constructor; "muon" also
    takes adamw_lr (default MUON_ADAMW_LR_RATIO * lr) for its AdamW groups,
    muon_weight_decay (default weight_decay) for its hidden matrices (the GN
    paper's inner Muon decays only the AdamW groups) and hidden, the names of
    the hidden matrices (`split_muon_params`)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    named_params = list(named_params)
    betas = DEFAULT_BETAS[name] if betas is None else betas
    if name != "muon":
        params = [tensor for _, tensor in named_params]
        return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, betas=betas, **kwargs)
    adamw_lr = kwargs.pop("adamw_lr", MUON_ADAMW_LR_RATIO * lr)
    muon_weight_decay = kwargs.pop("muon_weight_decay", weight_decay)
    muon_named, adamw_named = split_muon_params(named_params, kwargs.pop("hidden", None))
    groups = [dict(params=[t for _, t in muon_named], use_muon=True, weight_decay=muon_weight_decay),
              dict(params=[t for _, t in adamw_named], use_muon=False, lr=adamw_lr)]
    return Muon([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay, betas=betas, **kwargs)
