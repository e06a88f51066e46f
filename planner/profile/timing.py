"""Timing layers and whole steps: the clock, isolated layer runs, and the CPU allocator setting.

The pieces :mod:`planner.profile.measure` assembles (see its docstring for the procedure and the
decisions): :class:`Timer` reads a clock with the device synchronised, :class:`LayerRunner` runs
one layer alone on fresh copies of its recorded inputs, :func:`whole_step` times one
forward+backward of the whole model, :func:`time_split` times the backward's input- and
weight-gradient parts once per kind of layer, and :func:`keep_freed_memory` stops glibc from returning
and page-faulting large tensors on every step.

Example:
    >>> import time, torch
    >>> net = torch.nn.Linear(4, 4)
    >>> gm = torch.fx.symbolic_trace(net)
    >>> timer = Timer(time.perf_counter, torch.device("cpu"))
    >>> fwd_ms, bwd_ms = whole_step(gm, (torch.randn(2, 4),), timer)
    >>> fwd_ms >= 0 and bwd_ms >= 0
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import platform
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate, map_arg

from planner.profile.capture import CapturedLayer
from planner.profile.record import Recording, fetch_attr, flatten_tensors

__all__ = [
    "AGREE_FRACTION",
    "AGREE_MS",
    "Clock",
    "GradOnes",
    "LayerRunner",
    "Timer",
    "glibc_available",
    "keep_freed_memory",
    "time_split",
    "whole_step",
]

Clock = Callable[[], float]
"""A clock in seconds, e.g. ``time.perf_counter`` or ``time.process_time``."""

AGREE_FRACTION = 0.05
AGREE_MS = 0.02
"""Two samples agree within this fraction of the smaller or this many ms; agreeing stops early."""


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_kept = 0  # depth of nested keep_freed_memory() blocks


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Make glibc malloc serve large tensors from its heap and keep freed memory, for a while.

    Inside, freed CPU tensors are reused instead of being unmapped and page-faulted in again,
    as a caching allocator would; on leaving the outermost block glibc's default limits are set
    again and free memory is returned to the system (``malloc_trim``). Yields whether it
    applied (glibc only). Process-wide, like the thread count: not for concurrent threads.

    Example:
        >>> with keep_freed_memory() as applied:
        ...     isinstance(applied, bool)
        True
    """
    global _kept
    libc = _glibc()
    if libc is None:
        yield False
        return
    if _kept == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, -1)  # converted to SIZE_MAX by glibc: never trim
    _kept += 1
    try:
        yield True
    finally:
        _kept -= 1
        if _kept == 0:
            for param, value in _GLIBC_DEFAULTS.items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)


def glibc_available() -> bool:
    """Whether :func:`keep_freed_memory` applies here (Linux with glibc)."""
    return _glibc() is not None


def _glibc() -> Any:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def time_split(
    runners: list[LayerRunner],
    backward_ms: Sequence[float],
    reps: int,
    timer: Timer,
    bar: Any,
) -> list[tuple[float, float]]:
    """Each layer's (B ms, W ms): the backward split, timed once per kind of layer.

    ``backward_ms`` are the layers' measured backward times; ``bar`` is a tqdm bar that gets one
    step per kind.

    Layers with equal :meth:`LayerRunner.signature` (same operation, configuration, parameter
    and input shapes: the 24 blocks of gpt2-medium, ResNet's repeated convolutions) run the same
    kernels, so the first of each kind is timed (one untimed split to pay its one-off costs, then
    ``reps``, medians) and stands for the others, scaled to each one's own ``backward_ms`` so that
    ``(B + W) / backward_ms`` is the measured one for every layer of the kind. Only the ratio of B
    to W is used (:meth:`LayerProfile.split_backward_ms`). Measured apart B + W is a little more
    than the joint backward, since work both need runs twice.
    """
    kinds: dict[str, list[int]] = {}
    for i, runner in enumerate(runners):
        kinds.setdefault(runner.signature(), []).append(i)
    bar.total = (bar.total or 0) + len(kinds)
    bar.refresh()
    splits: list[tuple[float, float]] = [(0.0, 0.0)] * len(runners)
    for members in kinds.values():
        first = members[0]
        samples = [runners[first].run_split(timer) for _ in range(reps + 1)][1:]
        b = statistics.median(s[0] for s in samples)
        w = statistics.median(s[1] for s in samples)
        for i in members:
            scale = backward_ms[i] / backward_ms[first] if backward_ms[first] > 0 else 1.0
            splits[i] = (b * scale, w * scale)
        bar.update()
    return splits


class Timer:
    """Reads the clock with the device synchronised, so queued GPU work is counted."""

    def __init__(self, clock: Clock, device: torch.device) -> None:
        self.clock = clock
        self.device = device
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return self.clock()


def whole_step(
    gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], timer: Timer
) -> tuple[float, float]:
    """One forward+backward of the whole model: (forward ms, backward ms)."""
    params = [p for p in gm.parameters() if p.requires_grad]
    t0 = timer()
    out = gm(*inputs)
    t1 = timer()
    outs = [t for t in flatten_tensors(out) if t.requires_grad]
    grads = [torch.ones_like(t) for t in outs]
    t2 = timer()
    if outs and params:
        torch.autograd.grad(outs, params, grads, allow_unused=True)
    t3 = timer()
    return (t1 - t0) * 1e3, (t3 - t2) * 1e3


class GradOnes:
    """Grad outputs of ones, one tensor per (shape, strides, dtype, device), shared by layers.

    One per layer would hold as much memory again as all the recorded activations; autograd
    only reads grad outputs, so layers with equal outputs can share one.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.stride(), like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = torch.ones_like(like)
        return self._cache[key]


class LayerRunner:
    """Runs one layer alone on fresh copies of its recorded inputs, collecting samples."""

    def __init__(
        self, gm: fx.GraphModule, layer: CapturedLayer, rec: Recording, ones: GradOnes
    ) -> None:
        self.ones = ones
        self.gm = gm
        self.node = layer.node
        self.rec = rec
        self.call = _caller(gm, layer.node)
        self.params = _trainable(gm, layer.node)
        self.inplace = layer.node in rec.inplace
        self.forward_ms: list[float] = []
        self.backward_ms: list[float] = []

    def settled(self) -> bool:
        """Whether two of the samples (forward + backward) agree, so more would not change much."""
        totals = sorted(f + b for f, b in zip(self.forward_ms, self.backward_ms, strict=True))
        return any(
            hi - lo <= max(AGREE_FRACTION * lo, AGREE_MS) for lo, hi in itertools.pairwise(totals)
        )

    def run(self, timer: Timer) -> None:
        """One repetition: time the forward, then the backward, on fresh inputs."""
        leaves: list[torch.Tensor] = []
        args, kwargs = self._fresh_args(leaves)
        wrt = leaves + self.params
        t0 = timer()
        out = self.call(args, kwargs)
        t1 = timer()
        outs = [t for t in flatten_tensors(out) if t.requires_grad]
        grad_out = [self.ones(t) for t in outs]
        backward_ms = 0.0
        if outs and wrt:
            t2 = timer()
            torch.autograd.grad(outs, wrt, grad_out, allow_unused=True)
            backward_ms = (timer() - t2) * 1e3
        self.forward_ms.append((t1 - t0) * 1e3)
        self.backward_ms.append(backward_ms)

    def run_split(self, timer: Timer) -> tuple[float, float]:
        """One repetition of the backward split on fresh inputs: (B ms, W ms).

        The forward (untimed), then ``torch.autograd.grad`` w.r.t. the inputs that need a
        gradient only, keeping the graph (B), then w.r.t. the layer's parameters only (W). B is 0
        when no input needs a gradient, W when the layer has no trainable parameter.
        """
        leaves: list[torch.Tensor] = []
        args, kwargs = self._fresh_args(leaves)
        out = self.call(args, kwargs)
        outs = [t for t in flatten_tensors(out) if t.requires_grad]
        grads = [self.ones(t) for t in outs]
        b_ms = w_ms = 0.0
        if outs and leaves:
            t0 = timer()
            torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True)
            b_ms = (timer() - t0) * 1e3
        if outs and self.params:
            t0 = timer()
            torch.autograd.grad(outs, self.params, grads, allow_unused=True)
            w_ms = (timer() - t0) * 1e3
        return b_ms, w_ms

    def signature(self) -> str:
        """What this layer's cost depends on, as text: two layers with equal signatures run the
        same kernels on the same shapes (e.g. the 24 blocks of a GPT), so one's timing stands
        for the other's.

        The operation (for a module: its class, its ``repr`` with the configuration, and its
        parameters' shapes, dtypes and whether they train), whether it works in place, and every
        argument: a tensor by shape, strides, dtype, device and whether it needs a gradient,
        anything else by ``repr``.
        """
        node = self.node
        if node.op == "call_module":
            sub = self.gm.get_submodule(str(node.target))
            what: Any = (
                type(sub).__module__,
                type(sub).__qualname__,
                repr(sub),
                [(tuple(p.shape), p.dtype, p.requires_grad) for p in sub.parameters()],
            )
        elif node.op == "call_function":
            fn: Any = node.target
            what = (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)))
        elif node.op == "call_method":
            what = str(node.target)
        else:  # get_attr: fetches one particular attribute
            what = ("attribute", str(node.target))

        def describe(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                grad = id(x) in self.rec.grad_ids
                return ("tensor", tuple(x.shape), x.stride(), x.dtype, x.device.type, grad)
            return repr(x)

        def value(n: fx.Node) -> Any:
            return map_aggregate(self.rec.values[n], describe)

        args = map_arg(node.args, value)
        kwargs = map_arg(node.kwargs, value)
        return repr((node.op, what, self.inplace, args, sorted(kwargs.items())))

    def _fresh_args(self, leaves: list[torch.Tensor]) -> tuple[Any, Any]:
        """The layer's args and kwargs made of fresh copies of the recorded values."""

        def fresh(n: fx.Node) -> Any:
            return map_aggregate(self.rec.values[n], lambda x: self._fresh(x, leaves))

        return map_arg(self.node.args, fresh), map_arg(self.node.kwargs, fresh)

    def _fresh(self, x: Any, leaves: list[torch.Tensor]) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) not in self.rec.grad_ids:
            return x.clone() if self.inplace else x.detach()
        if not self.inplace:
            leaf = x.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf
        leaf = x.clone().requires_grad_(True)
        leaves.append(leaf)
        # An in-place op may not modify a leaf that requires grad; give it a non-leaf copy.
        return leaf.clone()


def _caller(gm: fx.GraphModule, node: fx.Node) -> Callable[[Any, Any], Any]:
    """A function running ``node``'s computation on given args and kwargs."""
    target = node.target
    if node.op == "call_module":
        sub = gm.get_submodule(str(target))
        return lambda a, k: sub(*a, **k)
    if node.op == "call_function":
        fn: Any = target
        return lambda a, k: fn(*a, **k)
    if node.op == "call_method":
        return lambda a, k: getattr(a[0], str(target))(*a[1:], **k)
    value = fetch_attr(gm, str(target))
    return lambda a, k: value


def _trainable(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    """The trainable parameters a layer's backward computes gradients for."""
    if node.op == "call_module":
        return [p for p in gm.get_submodule(str(node.target)).parameters() if p.requires_grad]
    if node.op == "get_attr":
        value = fetch_attr(gm, str(node.target))
        if isinstance(value, torch.nn.Parameter) and value.requires_grad:
            return [value]
    return []
