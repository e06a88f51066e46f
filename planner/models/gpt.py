"""A GPT-style decoder built from torch.nn, so transformer planning works offline with no weights.

The model is GPT-2's shape (token and learned positional embeddings, ``n_layers`` pre-norm blocks
of causal self-attention and an MLP, a final LayerNorm and an LM head) written so torch.fx traces
it without leaf modules: no data-dependent Python control flow and no ``.size()`` calls in the
forward. Sequence length, heads and widths are fixed Python ints from the config, so only tensors
cross layer boundaries. Each block is a module of class ``Block`` named ``blocks.<i>``, so
``--leaf-modules Block`` profiles a whole block as one layer.

The LM head is untied from the token embedding by default (``tie_weights=False``), so every
parameter belongs to exactly one layer and a pipeline stage owns all of its weights; GPT-2 ties
them, which ``tie_weights=True`` reproduces (then the embedding's layer owns the shared matrix).

Example:
    >>> import torch
    >>> cfg = GPT_CONFIGS["gpt2-tiny"]
    >>> model = GPT(cfg)
    >>> ids = torch.zeros(2, cfg.seq_len, dtype=torch.long)
    >>> tuple(model(ids).shape)
    (2, 32, 256)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from planner.errors import ModelError

__all__ = ["GPT", "GPT_CONFIGS", "MLP", "Block", "CausalSelfAttention", "GPTConfig"]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Sizes of a GPT-style decoder.

    Attributes:
        n_layers: Number of transformer blocks.
        d_model: Width of the residual stream.
        n_heads: Attention heads; must divide ``d_model``.
        vocab_size: Tokens in the vocabulary (embedding rows and LM-head outputs).
        seq_len: Tokens per sample the model is built for (the context actually used).
        max_positions: Rows of the positional-embedding table; at least ``seq_len``. Kept apart
            from ``seq_len`` so a shorter context does not change the parameter count.
        mlp_ratio: Hidden width of the MLP as a multiple of ``d_model``.
        tie_weights: Share the LM head's weight with the token embedding (as GPT-2 does).
    """

    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    seq_len: int
    max_positions: int = 0
    mlp_ratio: int = 4
    tie_weights: bool = False

    def __post_init__(self) -> None:
        if self.max_positions == 0:
            object.__setattr__(self, "max_positions", self.seq_len)
        for name in ("n_layers", "d_model", "n_heads", "vocab_size", "seq_len", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ModelError(f"GPT {name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ModelError(
                f"GPT d_model {self.d_model} is not divisible by n_heads {self.n_heads}; "
                "choose a head count that divides the width"
            )
        if self.seq_len > self.max_positions:
            raise ModelError(
                f"sequence length {self.seq_len} exceeds the model's {self.max_positions} "
                f"positions; use an input shape of at most ({self.max_positions},)"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def with_seq_len(self, seq_len: int) -> GPTConfig:
        """The same model run on ``seq_len`` tokens per sample (parameters unchanged)."""
        return dataclasses.replace(self, seq_len=seq_len)


GPT_CONFIGS: dict[str, GPTConfig] = {
    # Small enough for unit tests: 2 blocks, ~0.2 M parameters.
    "gpt2-tiny": GPTConfig(n_layers=2, d_model=64, n_heads=2, vocab_size=256, seq_len=32),
    "gpt2-small": GPTConfig(n_layers=12, d_model=768, n_heads=12, vocab_size=50257, seq_len=1024),
    "gpt2-medium": GPTConfig(n_layers=24, d_model=1024, n_heads=16, vocab_size=50257, seq_len=1024),
    "gpt2-large": GPTConfig(n_layers=36, d_model=1280, n_heads=20, vocab_size=50257, seq_len=1024),
}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.seq_len = cfg.seq_len
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.d_model = cfg.d_model
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, 3 * D) -> (B, T, 3, H, Dh); -1 is the batch, the rest are config ints, so fx
        # records constants instead of size() calls.
        qkv = self.qkv(x).view(-1, self.seq_len, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(-1, self.seq_len, self.d_model)
        return self.proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear, GELU, Linear."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.act = nn.GELU()
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """One pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-2-shaped decoder: ids ``(B, seq_len)`` (long) to logits ``(B, seq_len, vocab)``.

    Parameters are initialised as GPT-2 does (normal, std 0.02; residual projections scaled by
    ``1/sqrt(2 * n_layers)``) from torch's global RNG, so seed it for reproducible weights.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_positions, cfg.d_model)
        # Positions are a fixed buffer, not torch.arange(T) in forward, so the traced graph
        # carries no shape arithmetic. Not persistent: it is derived from the config.
        self.register_buffer("positions", torch.arange(cfg.seq_len), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / (2 * cfg.n_layers) ** 0.5)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids) + self.pos_emb(self.positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
