"""A LLaMA-style decoder-only transformer, small enough to read in one sitting.

Token embedding, pre-norm blocks (RMSNorm, causal multi-head attention with
rotary position embeddings, SwiGLU MLP), a final RMSNorm and an untied output
head: the architecture the GN paper trained (Abreu et al. 2025, after LLaMA).

Two things here exist for Gauss-Newton (gn.py):
- Forward-mode AD works through the whole model. `F.scaled_dot_product_attention`
  has no forward-mode derivative, so attention falls back to an explicit
  softmax(QKᵀ)V whenever its inputs carry a tangent.
- `gn_blocks()` names the parameter blocks of layerwise GN, and
  `forward(h, start_block=i)` runs the network from the input of block i, so that
  layerwise GN can cache block inputs instead of rerunning the blocks below.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 128  # longest sequence the rotary tables cover
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 96
    mlp_hidden: int = 256  # SwiGLU inner width (LLaMA uses about 8/3 of n_embd)
    rope_base: float = 10000.0
    norm_eps: float = 1e-6


# `tiny` trains in minutes on 2 CPU cores; `45m` and `150m` are the paper's
# sizes with a 32k vocabulary (the exact count depends on the data's vocabulary).
PRESETS = {
    "tiny": GPTConfig(vocab_size=256, block_size=128, n_layer=3, n_head=4, n_embd=96, mlp_hidden=256),
    "small": GPTConfig(vocab_size=256, block_size=256, n_layer=6, n_head=8, n_embd=256, mlp_hidden=688),
    "45m": GPTConfig(vocab_size=32000, block_size=1024, n_layer=4, n_head=8, n_embd=512, mlp_hidden=1376),
    "150m": GPTConfig(vocab_size=32000, block_size=1024, n_layer=12, n_head=12, n_embd=768, mlp_hidden=2560),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(head_dim, length, base):
    """cos and sin of the rotary angles, shaped (length, head_dim // 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (x1, x2) of the last dimension by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def has_tangent(x):
    """True inside torch.func.jvp or forward_ad, where SDPA cannot be used."""
    return forward_ad.unpack_dual(x).tangent is not None


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if any(has_tangent(t) for t in (q, k, v)):
            y = plain_causal_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def plain_causal_attention(q, k, v):
    """softmax(QKᵀ/√d + causal mask) V, written out so forward-mode AD can pass."""
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)

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
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_base)
        # Not persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("rope_cos", cos.float(), persistent=False)
        self.register_buffer("rope_sin", sin.float(), persistent=False)
        self.apply(self._init_weights)
        # Residual projections scaled down so the residual stream's variance
        # does not grow with depth (GPT-2's rule).
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

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

    def forward(self, h, start_block=0):
        """Logits for token indices h (B, T), or from the input of a GN block.

        start_block 0: h holds token indices; 1..n_layer: h is the residual
        stream entering transformer block start_block-1; n_layer+1: h is the
        normalized final hidden state entering the head. Layerwise GN uses the
        later entries on cached `block_inputs` so it never reruns lower blocks.
        """
        if start_block == 0:
            h = self.embed(h)
        if start_block <= len(self.blocks):
            cos, sin = self._rotary(h.shape[1], h.dtype)
            for block in self.blocks[max(start_block - 1, 0):]:
                h = block(h, cos, sin)
            h = self.norm(h)
        return self.head(h)

    @torch.no_grad()
    def block_inputs(self, idx):
        """The input of every GN block for tokens idx, as `forward(h, start_block=i)` takes them."""
        h = self.embed(idx)
        inputs = [idx, h]
        cos, sin = self._rotary(idx.shape[1], h.dtype)
        for block in self.blocks[:-1]:
            h = block(h, cos, sin)
            inputs.append(h)
        inputs.append(self.norm(self.blocks[-1](h, cos, sin)))
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
