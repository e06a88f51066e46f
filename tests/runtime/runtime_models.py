"""Small models for the runtime tests, importable as ``runtime_models:NAME``.

No dropout, so every run is deterministic. ``cnn_bn`` has BatchNorm: its batch statistics are
per microbatch (as single-process training with the same microbatches), and the runtime keeps
the running statistics of single-process training even on replicated stages.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from planner.models import GPT, GPT_CONFIGS, ModelSpec


def _batch(batch_size: int, seed: int, *, shape: tuple[int, ...], classes: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *shape), generator=gen)
    return (x,), torch.randint(classes, (batch_size,), generator=gen)


def _ce(outputs, targets):
    return F.cross_entropy(outputs, targets)


def _tokens(batch_size: int, seed: int, *, seq_len: int, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (batch_size, seq_len + 1), generator=gen)
    return (ids[:, :-1].contiguous(),), ids[:, 1:].contiguous()


def _token_ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def mlp() -> ModelSpec:
    module = nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.Tanh(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )
    return ModelSpec(
        name="runtime_models:mlp",
        module=module,
        input_shape=(16,),
        input_dtype=torch.float32,
        make_batch=partial(_batch, shape=(16,), classes=4),
        loss_fn=_ce,
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class _ResNetLite(nn.Module):
    """Stem, two residual blocks, pool, classifier; flatten via ``x.size(0)`` on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = _Residual(8)
        self.block2 = _Residual(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.block2(self.block1(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


def cnn() -> ModelSpec:
    return ModelSpec(
        name="runtime_models:cnn",
        module=_ResNetLite(),
        input_shape=(3, 8, 8),
        input_dtype=torch.float32,
        make_batch=partial(_batch, shape=(3, 8, 8), classes=5),
        loss_fn=_ce,
    )


def gpt_tied() -> ModelSpec:
    """gpt2-tiny's shape, shorter, with the LM head tied to the token embedding (as GPT-2)."""
    cfg = GPT_CONFIGS["gpt2-tiny"].with_seq_len(8)
    cfg = dataclasses.replace(cfg, tie_weights=True)
    return ModelSpec(
        name="runtime_models:gpt_tied",
        module=GPT(cfg).train(),
        input_shape=(8,),
        input_dtype=torch.long,
        make_batch=partial(_tokens, seq_len=8, vocab=cfg.vocab_size),
        loss_fn=_token_ce,
    )


class _BNNet(nn.Module):
    """Conv-BatchNorm-ReLU stem, a residual block with BatchNorm, BatchNorm1d before the head.

    Convolutions before BatchNorm have no bias (as in ResNets): its gradient would be rounding
    noise, which Adam's normalisation turns into steps of size ``lr`` in random directions.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6, momentum=0.3)
        self.bn2 = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn1(self.conv(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.bn2(x))


def cnn_bn() -> ModelSpec:
    return ModelSpec(
        name="runtime_models:cnn_bn",
        module=_BNNet(),
        input_shape=(3, 6, 6),
        input_dtype=torch.float32,
        make_batch=partial(_batch, shape=(3, 6, 6), classes=3),
        loss_fn=_ce,
    )
