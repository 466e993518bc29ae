"""GaussNewton on models this project did not design.

nanoGPT's GPT written here from stock modules (nn.Embedding for tokens and
positions, nn.LayerNorm, a GELU MLP, `F.scaled_dot_product_attention`, an
nn.ModuleList of blocks, the head tied to the token embedding, and its
interface: model(tokens, targets) -> (logits, loss)), torch's own
nn.TransformerEncoder, and Hugging Face's GPT2LMHeadModel and
LlamaForCausalLM from small random configs (no download; skipped where
`transformers` is not installed). Each is checked
against references computed here: its blocks, Muon's split, a full and a
layerwise step that lower the loss, and the slope and curvature the step
reports along the direction it took, against autograd and `torch.func.jvp`.
Last, model.GPT's hand-written tangents against the same network built from
stock modules with the same weights.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from baselines import hidden_matrices, split_muon_params
from gn import GaussNewton, default_blocks, model_gradient
from model import GPT, PAPER_ARCH, GPTConfig

VOCAB, T = 16, 8


# ---------------------------------------------------------------------------
# nanoGPT's GPT (Karpathy's model.py, its architecture written anew from stock modules)


class NanoAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T_, C = x.shape
        q, k, v = (t.view(B, T_, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T_, C))


class NanoBlock(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), NanoAttention(d, n_head), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab=VOCAB, block_size=T, n_layer=2, d=32, n_head=2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block_size, d),
            h=nn.ModuleList(NanoBlock(d, n_head) for _ in range(n_layer)), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does
        for module in self.modules():  # nanoGPT's init
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """nanoGPT's interface: (logits, loss); without targets, the logits of the last position only."""
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:]), None
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class TorchEncoderLM(nn.Module):
    """torch's own nn.TransformerEncoder (nn.MultiheadAttention inside) under a causal mask, a positional
    table held as a bare parameter, an untied head."""

    def __init__(self, d=32):
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(1, T, d))
        self.emb = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, VOCAB)

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], dtype=self.pos.dtype)
        return self.out(self.encoder(self.emb(idx) + self.pos[:, :idx.shape[1]], mask=mask, is_causal=True))


def hugging_face(name):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=2, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def build(name):
    torch.manual_seed(0)
    model = {"nanogpt": NanoGPT, "torch_encoder": TorchEncoderLM}.get(name, lambda: hugging_face(name))()
    return model.double().eval()


# Every parameter name of one layer, for the expected blocks.
def layer(model, prefix):
    return [f"{prefix}.{n}" for n, _ in model.get_submodule(prefix).named_parameters()]


EXPECTED_BLOCKS = {
    # The tied head adds no block; the final norm joins the last layer.
    "nanogpt": lambda m: [["transformer.wte.weight"], ["transformer.wpe.weight"], layer(m, "transformer.h.0"),
                          layer(m, "transformer.h.1") + ["transformer.ln_f.weight", "transformer.ln_f.bias"]],
    "gpt2": lambda m: [["transformer.wte.weight"], ["transformer.wpe.weight"], layer(m, "transformer.h.0"),
                       layer(m, "transformer.h.1") + ["transformer.ln_f.weight", "transformer.ln_f.bias"]],
    "llama": lambda m: [["model.embed_tokens.weight"], layer(m, "model.layers.0"),
                        layer(m, "model.layers.1") + ["model.norm.weight"], ["lm_head.weight"]],
    "torch_encoder": lambda m: [["pos"], ["emb.weight"], layer(m, "encoder.layers.0"), layer(m, "encoder.layers.1"),
                                ["out.weight", "out.bias"]],
}
MODELS = list(EXPECTED_BLOCKS)


def counting_batches(generator, n, batch_size=4, name=None):
    """Sequences counting up from a random start modulo the vocabulary: learnable in a few steps. nanoGPT
    gives the logits of every position only with targets: its inputs are (tokens, targets)."""
    batches = []
    for _ in range(n):
        seq = (torch.randint(0, VOCAB, (batch_size, 1), generator=generator) + torch.arange(T + 1)) % VOCAB
        x, y = seq[:, :-1], seq[:, 1:]
        batches.append(((x, y) if name == "nanogpt" else x, y))
    return batches


def mean_loss(model, batches):
    with torch.no_grad():
        return sum(F.cross_entropy(logits_of(model, x).flatten(0, 1), y.flatten()).item() for x, y in batches) / len(batches)


def logits_of(model, x, params=None):
    args = x if isinstance(x, tuple) else (x,)
    out = model(*args) if params is None else functional_call(model, params, args)
    return out if torch.is_tensor(out) else out[0] if isinstance(out, tuple) else out.logits


@pytest.mark.parametrize("name", MODELS)
def test_blocks_are_one_per_layer_with_every_parameter_once(name):
    model = build(name)
    blocks = default_blocks(model)
    assert blocks == EXPECTED_BLOCKS[name](model)
    flat = [n for b in blocks for n in b]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())
    assert GaussNewton(model, mode="layerwise").blocks == blocks


@pytest.mark.parametrize("name", MODELS)
def test_muon_splits_by_role(name):
    """Muon orthogonalizes the layers' 2-D weights only: not the embeddings, the (tied or untied) head, gains."""
    model = build(name)
    layers = {"llama": "model.layers", "torch_encoder": "encoder.layers"}.get(name, "transformer.h")
    expected = {n for n, p in model.named_parameters() if n.startswith(layers) and p.ndim == 2}
    assert hidden_matrices(model) == expected
    opt = GaussNewton(model, mode="layerwise")
    for inner, names in zip(opt.inner_opts, opt.blocks):
        for group in inner.param_groups:
            members = {n for n in names if any(opt.iterate[n] is p for p in group["params"])}
            assert members == {n for n in names if (n in expected) == group["use_muon"]}


def test_muon_split_by_role_is_model_gpts_split_by_name():
    """On model.GPT, both architectures, the role rule picks what the name rule of train.py's baseline Muon
    picks: GN's inner Muon there is unchanged."""
    for arch in ({}, PAPER_ARCH):
        model = GPT(GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=2, n_head=2, n_embd=32, mlp_hidden=48, **arch))
        by_name = {n for n, _ in split_muon_params(model.named_parameters())[0]}
        assert hidden_matrices(model) == by_name and len(by_name) > 0


@pytest.mark.parametrize("mode", ["full", "layerwise"])
@pytest.mark.parametrize("name", MODELS)
def test_step_lowers_the_loss_and_reports_the_model_along_its_direction(name, mode):
    """Two steps lower the loss on held-out batches; the slope and curvature of the first equal gᵀd from
    autograd and (Jd)ᵀH(Jd) from torch.func.jvp and the loss's second derivative along Jd, on the
    line-search batch the model came from."""
    model = build(name)
    generator = torch.Generator().manual_seed(1)
    batches = lambda n: counting_batches(generator, n, name=name)
    held_out = batches(2)
    before = mean_loss(model, held_out)
    opt = GaussNewton(model, mode=mode)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ls_batches = batches(2)
    stats = opt.step(batches(3), ls_batches)
    assert stats["step_size"] > 0
    d = {n: opt.iterate[n] - theta0[n] for n in theta0}  # the direction the step took: θ = θ0 + η d

    x, y = ls_batches[0]  # ls_model_fraction 0.5 of two batches: the model comes from the first
    loss = lambda p: F.cross_entropy(logits_of(model, x, p).flatten(0, 1), y.flatten())
    params = {n: t.clone().requires_grad_() for n, t in theta0.items()}
    grads = torch.autograd.grad(loss(params), list(params.values()))
    slope = sum((g * d[n]).sum() for g, n in zip(grads, params)).item()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # torch's fused encoder layer has no forward mode
    try:
        with sdpa_kernel(SDPBackend.MATH):
            z0, jd = jvp(lambda p: logits_of(model, x, p), (theta0,), (d,))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    along = lambda t: F.cross_entropy((z0 + t * jd).flatten(0, 1), y.flatten())
    curvature = torch.autograd.functional.hessian(along, torch.zeros((), dtype=z0.dtype)).item()
    assert stats["slope"] == pytest.approx(slope, rel=1e-8, abs=1e-12)
    assert stats["curvature"] == pytest.approx(curvature, rel=1e-8)
    with torch.no_grad():
        assert dict(model.named_parameters()).keys() == d.keys()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, theta0[n] + stats["step_size"] * d[n])

    opt.step(batches(3), batches(2))
    assert mean_loss(model, held_out) < before - 0.1


# ---------------------------------------------------------------------------
# model.GPT's hand-written tangents against stock modules


class StockAttention(nn.Module):
    def __init__(self, C, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv, self.proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)

    def forward(self, x, cos, sin):
        B, T_, C = x.shape
        q, k, v = self.qkv(x).view(B, T_, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)

        def rotate(t):  # each head's two halves, rotated by each position's angle
            a, b = t.chunk(2, dim=-1)
            return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

        y = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T_, C))


class StockSwiGLU(nn.Module):
    def __init__(self, C, hidden):
        super().__init__()
        self.gate, self.up = nn.Linear(C, hidden, bias=False), nn.Linear(C, hidden, bias=False)
        self.down = nn.Linear(hidden, C, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class StockBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(c.n_embd, eps=c.norm_eps), StockAttention(c.n_embd, c.n_head)
        self.mlp_norm, self.mlp = nn.RMSNorm(c.n_embd, eps=c.norm_eps), StockSwiGLU(c.n_embd, c.mlp_hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class StockLlama(nn.Module):
    """model.GPT's network (LLaMA: RMSNorm, rotary on two halves, SwiGLU, untied head) from stock modules."""

    def __init__(self, c):
        super().__init__()
        self.embed = nn.Embedding(c.vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(StockBlock(c) for _ in range(c.n_layer))
        self.norm, self.head = nn.RMSNorm(c.n_embd, eps=c.norm_eps), nn.Linear(c.n_embd, c.vocab_size, bias=False)
        head_dim = c.n_embd // c.n_head
        inv_freq = c.rope_base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(c.block_size, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # float32 tables, as model.GPT keeps
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, idx):
        x = self.embed(idx)
        cos, sin = self.cos[:idx.shape[1]].to(x.dtype), self.sin[:idx.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def test_hand_written_tangents_match_stock_modules():
    """model.GPT (its kernels' own jvp and backward, cached block inputs) and the same network from stock
    modules with the same weights give the same full and layerwise ∇Q, to round-off."""
    config = GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=2, n_head=2, n_embd=32, mlp_hidden=48)
    torch.manual_seed(0)
    ours = GPT(config).double()
    stock = StockLlama(config).double()
    stock.load_state_dict(ours.state_dict())
    x, y = counting_batches(torch.Generator().manual_seed(2), 1)[0]
    torch.testing.assert_close(stock(x), ours(x), rtol=1e-12, atol=1e-12)
    assert default_blocks(stock) == default_blocks(ours)
    delta = {n: 0.01 * torch.randn_like(p) for n, p in ours.named_parameters()}
    for mode in ("full", "layerwise"):
        gradients = []
        for model in (ours, stock):
            opt = GaussNewton(model, mode=mode)
            for n, p in model.named_parameters():
                opt.iterate[n].copy_(p.detach() + delta[n])
            gradients.append({n: g for block in opt.inner_gradients(x, y) for n, g in block.items()})
        assert gradients[0].keys() == gradients[1].keys()
        for n in gradients[0]:
            torch.testing.assert_close(gradients[1][n], gradients[0][n], rtol=1e-9, atol=1e-12)
    f = lambda model: (lambda p: functional_call(model, p, (x,)))
    params = lambda model: {n: p.detach() for n, p in model.named_parameters()}
    full = [model_gradient(f(m), params(m), delta, y)[0] for m in (ours, stock)]
    for n in full[0]:
        torch.testing.assert_close(full[1][n], full[0][n], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# What a model must offer


class Distances(nn.Module):
    """A layer through torch.cdist, which has no forward-mode derivative."""

    def __init__(self):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return torch.cdist(x, self.centres)


def test_an_op_without_forward_mode_is_named():
    model = Distances()
    opt = GaussNewton(model, mode="full", loss="ce")
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    with pytest.raises(NotImplementedError, match=r"_cdist_forward has no forward-mode derivative.*jvp"):
        opt.step([(x, y), (x, y)])


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x):
        return {"scores": self.linear(x), "extra": x}


def test_outputs_picks_what_the_loss_sees():
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    with pytest.raises(TypeError, match="outputs="):
        GaussNewton(Pair(), mode="full").step([(x, y), (x, y)])
    model = Pair()
    with torch.no_grad():
        expected = F.cross_entropy(model.linear(x), y).item()
    stats = GaussNewton(model, mode="full", outputs=lambda out: out["scores"]).step([(x, y), (x, y)])
    assert stats["loss_before"] == pytest.approx(expected, rel=1e-6)
    assert stats["step_size"] > 0


class Keywords(nn.Module):
    """Takes its input by keyword, as a Hugging Face model takes a tokenizer's BatchEncoding."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, features=None, scale=1.0):
        return self.linear(features) * scale


def test_inputs_may_be_a_tensor_a_tuple_or_a_mapping():
    """A micro-batch's inputs: a tensor is the one argument, a tuple the arguments, any mapping (a dict, a
    UserDict like transformers' BatchEncoding) the keyword arguments: the same step either way."""
    import collections
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    losses = []
    for inputs in (x, (x, 1.0), {"features": x}, collections.UserDict({"features": x, "scale": 1.0})):
        torch.manual_seed(0)
        model = Keywords()
        losses.append(GaussNewton(model, mode="full").step([(inputs, y), (inputs, y)])["loss_after"])
    assert losses[1:] == [losses[0]] * 3


def test_frozen_parameters_stay_where_they_are_and_get_no_block():
    """Parameters that do not require grad (a frozen embedding, a frozen layer: fine-tuning, adapters) are
    not GN's: no block lists them and a step leaves them as they were."""
    model = build("nanogpt")
    frozen = {n for n, _ in model.named_parameters() if n.startswith(("transformer.wte", "transformer.h.0."))}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = GaussNewton(model, mode="layerwise")
    assert opt.blocks == [b for b in ([n for n in block if n not in frozen] for block
                                      in EXPECTED_BLOCKS["nanogpt"](model)) if b]
    assert opt.step(*[counting_batches(torch.Generator().manual_seed(3), k, name="nanogpt") for k in (3, 2)])[
        "step_size"] > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n
        assert p.requires_grad == (n not in frozen)


class HeadFirst(nn.Module):
    """The head registered before the layers, and no separate head at all (tied through F.linear)."""

    def __init__(self, tied):
        super().__init__()
        self.tied = tied
        if not tied:
            self.head = nn.Linear(8, VOCAB, bias=False)
        self.embed = nn.Embedding(VOCAB, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = x + layer(x)
        return F.linear(x, self.embed.weight) if self.tied else self.head(x)


def test_hidden_matrices_find_the_head_wherever_it_is_registered():
    for tied in (False, True):
        assert hidden_matrices(HeadFirst(tied)) == {"layers.0.0.weight", "layers.1.0.weight"}
