"""A small causal Transformer in plain torch, readable top to bottom (nanoGPT-shaped).

Every parameter is used through its own module's forward (nn.Embedding, nn.LayerNorm,
nn.Linear), never functionally, so module hooks (the gradient probe) see every use; with
``tie_weights`` the head's weight *is* ``wte.weight`` (GPT-2's tying). Shapes: B batch, T
time, C = n_embd, V vocabulary.

Thread-count invariance (CPU): torch's fused LayerNorm backward sums the weight and bias
gradients over rows in per-thread partial sums, so they differ in the last bits with the
number of threads, and over hundreds of Adam steps the SFT model drifts (issue 11: the
headline "chosen falls" flipped sign between 1 and 2 threads). :class:`LayerNorm` computes
the same function as ``x_hat * weight + bias`` with an unaffine ``F.layer_norm``; autograd
then reduces those gradients with a plain ``sum``, which is thread-count invariant, as are
every other forward and backward of this model on CPU (``tests/test_transformer_repro.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gesim.errors import GesimError


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    bias: bool = True
    tie_weights: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise GesimError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with a thread-count-invariant backward (see the module docstring).

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last dimension; still an
    ``nn.LayerNorm`` (same parameters, same state dict), so the gradient probe recognises it.
    """

    same_as_layer_norm = True  # x_hat * weight + bias exactly: the probe's recorder uses its LayerNorm rule

    def forward(self, x):
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, h, T, c)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2-style decoder: token + position embeddings, pre-LN blocks, final LN, (tied) head."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids ``idx`` (B, T)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise GesimError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device).expand(B, T)  # (B, T): per-row positions
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)
