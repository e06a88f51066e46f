"""Measuring a model layer by layer: forward and backward time, activation and parameter sizes.

How a profile is taken (:func:`profile_module`):

1. **Capture** the model as a layer DAG (:func:`planner.profile.capture.capture`).
2. **Warm up and record**: ``warmup - 1`` untimed whole-model steps, then one run through the
   graph with an fx interpreter (:func:`planner.profile.record.record`) that keeps every layer's
   inputs and learns the sizes; with its backward pass (when ``warmup >= 1``) it is the last
   warm-up step. Every layer runs inside these steps on exactly the shapes it is timed on, so one
   whole-model step warms every layer's kernels (oneDNN primitives, cuDNN plans, allocator
   pools) for the price of one step instead of one isolated warm-up per layer.
3. **Time the layers**: rounds over the layers, each running a layer alone on fresh copies of
   its recorded inputs and timing its forward and then its backward (``torch.autograd.grad``
   w.r.t. the inputs that required grad in the model and the layer's parameters, grad outputs
   of ones). Two rounds always; up to ``reps`` rounds for the layers whose samples do not yet
   agree (two within 5% or 0.02 ms), so repetitions go where the noise is. Medians are kept;
   raw samples are in ``*_samples_ms``.
3b. **Split the backward** (``split_backward``; :func:`profile_model` always does): on the same
   recording, the input-gradient (B) and weight-gradient (W) parts of each kind of layer, for the
   zero-bubble schedules. Layers of one kind (equal operation, configuration and input shapes,
   such as a GPT's blocks) share one measurement, so a 24-block model pays for one block: before,
   a second recording pass and a split of every layer took ~4 of gpt2-medium's 15 profiling
   minutes (benchmarks/RESULTS.md).
4. **Time the whole step**: the recorded activations are freed, then one whole-model
   forward+backward is timed; if it disagrees with the per-layer sum by more than 10%, more are
   timed (up to ``reps``) and the median is kept, so one disturbed sample cannot trigger (5).
5. **Check**: if the per-layer sum is still off the whole step by more than 10%, forward and
   backward times are scaled separately to the whole step's forward and backward, and
   ``Profile.calibration`` says by how much (raw samples stay unscaled).

Decisions:

* Inputs get ``requires_grad`` where the value required grad in the model, not merely where it
  is floating point: the model's input images or a float mask buffer get no gradient in
  training, so differentiating w.r.t. them would overstate the backward.
* A layer with nothing differentiable (no input requiring grad, no trainable parameter) has
  backward time 0: autograd never visits it in a training step.
* Inputs of layers that changed an input in place during the recording (``ReLU(inplace=True)``)
  are cloned for every repetition, so repetitions cannot corrupt them; every other layer gets
  fresh detached aliases (new autograd leaves, no copy), since the recording proved it leaves
  its inputs alone. This keeps gigabytes of copies out of the profiling time.
* Recorded values may have been overwritten by a later in-place layer; shapes, dtypes and
  strides are exact, which is what the cost of dense kernels depends on.
* On Linux with glibc, CPU tensors over 32 MiB are fresh ``mmap`` s, page-faulted in on every
  allocation and unmapped when freed, in every step; on this project's VM that was a third of a
  ResNet-50 step and made timings noisy. :func:`keep_freed_memory` makes malloc keep freed
  memory during profiling, as a caching allocator (CUDA's, or jemalloc's) would; the runtime
  should train under the same setting for its steps to match the profile.

Defaults ``warmup=1, reps=3``: one warm-up suffices because of (2); up to three repetitions
give a median robust to one outlier (another process waking up), and stopping at two agreeing
samples keeps the cost near ``warmup + 2 + 1`` training steps plus start-up (first-touch page
faults, building the model); benchmarks/profile_overhead.py measures it.

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> p = profile_module(net, (torch.randn(8, 16),), model_name="mlp")
    >>> [layer.name for layer in p.layers], p.layers[0].parameter_bytes, p.layers[0].output_bytes
    (['_0', '_1', '_2'], 2176, (1024,))
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from planner.errors import ProfileError
from planner.profile.capture import CapturedGraph, capture
from planner.profile.format import LayerProfile, Profile
from planner.profile.memory import (
    MEMORY_FRACTION,
    available_bytes,
    check_profiling_memory,
    estimate_profiling_memory,
)
from planner.profile.record import layer_sizes, record
from planner.profile.timing import (
    Clock,
    GradOnes,
    LayerRunner,
    Timer,
    keep_freed_memory,
    time_split,
    whole_step,
)

__all__ = [
    "DEFAULT_REPS",
    "DEFAULT_WARMUP",
    "SUM_TOLERANCE",
    "default_leaf_modules",
    "default_profile_batch",
    "keep_freed_memory",
    "machine_description",
    "measure_backward_split",
    "profile_model",
    "profile_module",
]

DEFAULT_WARMUP = 1
"""Untimed whole-model steps before timing (each warms every layer once)."""
DEFAULT_REPS = 3
"""Most timed repetitions per layer and of the whole step; the median is kept."""
SUM_TOLERANCE = 0.10
"""Per-layer times must add up to the whole step within this fraction, else they are calibrated."""


_BLOCK_MODELS = ("gpt2-small", "gpt2-medium", "gpt2-large")


def default_leaf_modules(spec: str) -> tuple[str, ...]:
    """Leaf modules to profile with when none are given: ``Block`` for the larger bundled GPTs.

    Profiling every op of a 24-block decoder takes minutes, and a pipeline cuts between blocks
    anyway; the shipped ``gpt2-small`` profile is taken the same way. ``gpt2-tiny`` (a test
    model) and other models keep one layer per op.

    Example:
        >>> default_leaf_modules("gpt2-medium"), default_leaf_modules("resnet50")
        (('Block',), ())
    """
    return ("Block",) if spec in _BLOCK_MODELS else ()


def default_profile_batch(spec: str) -> int:
    """The batch ``plan`` profiles at when not told: 1 sequence for the bundled GPTs (a 1024-token
    sample is already a large unit of work), else 32; a batch that does not fit in memory is
    reduced (:func:`profile_model` with ``fit_batch``).

    Example:
        >>> default_profile_batch("gpt2-medium"), default_profile_batch("resnet50")
        (1, 32)
    """
    return 1 if spec.startswith("gpt2-") else 32


def profile_model(
    spec: str,
    *,
    batch_size: int,
    input_shape: Sequence[int] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    leaf_modules: Sequence[str] = (),
    warmup: int = DEFAULT_WARMUP,
    reps: int = DEFAULT_REPS,
    threads: int | None = None,
    progress: bool = True,
    seed: int = 0,
    calibrate: bool = True,
    clock: Clock = time.perf_counter,
    fit_batch: bool = False,
    batch_option: str = "--batch-size",
    memory_budget_bytes: float | None = None,
) -> Profile:
    """Profile a model by name (see :func:`planner.models.load_model`) on synthetic data.

    On the CPU, the memory the batch needs is estimated first
    (:func:`planner.profile.memory.estimate_profiling_memory`); a batch that needs more than
    half of the free memory is refused with the batch that fits, or with ``fit_batch`` replaced
    by the largest that fits (said on stderr).

    Args:
        spec: torchvision model name, bundled GPT name, or ``package.module:factory``.
        batch_size: Samples per profiled batch.
        input_shape: One sample's shape (vision default ``(3, 224, 224)``; GPT ``(seq_len,)``).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
        dtype: Parameter and activation dtype, e.g. ``"float32"`` or ``"bfloat16"``.
        leaf_modules: Module types or qualified names kept whole as one layer.
        warmup: Untimed whole-model forward+backward steps before timing; the last is the
            recording pass. 0 leaves only the recording forward untimed.
        reps: Most timed repetitions per layer and of the whole step (median kept); a layer
            stops at two when they agree, the whole step at one when it matches the layers.
        threads: CPU threads to fix for the run (default: torch's current count).
        progress: Show a progress bar over layers on stderr.
        seed: Seed of the weights and the synthetic batch.
        calibrate: Scale per-layer times to the whole step when they are off by more than 10%.
        clock: Seconds for timing: wall clock by default; ``time.process_time`` with
            ``threads=1`` measures CPU time, which other busy processes on a shared machine
            disturb far less (with more threads it would add up the threads' times).
        fit_batch: Profile at a smaller batch when ``batch_size`` does not fit in memory.
        batch_option: The option that sets the batch, named in the refusal.
        memory_budget_bytes: Memory profiling may use (default: half of ``MemAvailable``).

    Raises:
        ModelError: the model cannot be built, traced or run on this input shape.
        ProfileError: bad ``warmup``, ``reps`` or ``threads``; the batch does not fit in memory.

    Example:
        >>> p = profile_model("gpt2-tiny", batch_size=2, leaf_modules=["Block"], progress=False)
        >>> [layer.name for layer in p.layers][3:6], p.input_shape, p.source
        (['add', 'blocks_0', 'blocks_1'], (32,), 'planner')
    """
    from planner.models import load_model

    model = load_model(
        spec, batch_size=batch_size, input_shape=input_shape, dtype=dtype, device=device, seed=seed
    )
    inputs, _ = model.make_batch(batch_size, seed)
    if torch.device(device).type == "cpu":
        estimate = estimate_profiling_memory(model.module, inputs, leaf_modules)
        budget = memory_budget_bytes
        if budget is None:
            free = available_bytes()
            budget = None if free is None else MEMORY_FRACTION * free
        if budget is not None and estimate.new_bytes > budget:
            fit = estimate.largest_batch(budget)
            if not (fit_batch and fit >= 1):
                check_profiling_memory(
                    estimate, model=model.name, option=batch_option, budget_bytes=budget
                )
            print(
                f"profiling {model.name} at batch {fit}: batch {batch_size} would need about "
                f"{estimate.new_bytes / 1024**3:.1f} GiB, more than half of the free memory "
                f"({budget / 1024**3:.1f} GiB); {batch_option} to choose",
                file=sys.stderr,
            )
            batch_size = fit
            inputs, _ = model.make_batch(batch_size, seed)
    return profile_module(
        model.module,
        inputs,
        model_name=model.name,
        leaf_modules=leaf_modules,
        warmup=warmup,
        reps=reps,
        threads=threads,
        progress=progress,
        calibrate=calibrate,
        clock=clock,
        split_backward=True,
    )


def profile_module(
    module: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    model_name: str | None = None,
    leaf_modules: Sequence[str] = (),
    warmup: int = DEFAULT_WARMUP,
    reps: int = DEFAULT_REPS,
    threads: int | None = None,
    progress: bool = False,
    calibrate: bool = True,
    clock: Clock = time.perf_counter,
    split_backward: bool = False,
) -> Profile:
    """Profile ``module`` on the batch ``inputs`` (dim 0 of the first is the batch size).

    With ``split_backward``, each layer's backward is also measured as input gradient (B) and
    weight gradient (W), on the same recording, once per kind of layer (step 3b of the module
    docstring); ``Profile.backward_split`` is then ``"measured"``.

    The module runs in training mode; its mode, its buffers (BatchNorm statistics) and the
    thread count are restored afterwards, and no ``.grad`` is touched. ``clock`` returns seconds
    (tests inject a fake one); on CUDA the device is synchronised before every reading. On the
    CPU it runs inside :func:`keep_freed_memory`.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
        >>> p = profile_module(net, (torch.randn(2, 4),), warmup=0, reps=1)
        >>> p.batch_size, p.input_shape, p.reps, len(p.layers[0].forward_samples_ms)
        (2, (4,), 1, 1)
    """
    if warmup < 0 or reps < 1:
        raise ProfileError(f"need warmup >= 0 and reps >= 1, got warmup={warmup}, reps={reps}")
    if threads is not None and threads < 1:
        raise ProfileError(f"threads must be at least 1, got {threads}; omit it to keep torch's")
    inputs = tuple(inputs)
    first = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if first is None:
        raise ProfileError("profile_module needs a batched tensor input (dim 0 is the batch)")
    name = model_name or type(module).__name__
    old_threads = torch.get_num_threads()
    n_threads = threads or old_threads
    was_training = module.training
    buffers = {key: b.detach().clone() for key, b in module.named_buffers()}
    memory = keep_freed_memory() if first.device.type == "cpu" else contextlib.nullcontext()
    try:
        torch.set_num_threads(n_threads)
        module.train()
        graph = capture(module, leaf_modules)
        with memory as kept:
            layers, whole_ms, calibration = _measure(
                graph,
                inputs,
                warmup,
                reps,
                Timer(clock, first.device),
                progress,
                name,
                calibrate,
                split_backward,
            )
    finally:
        torch.set_num_threads(old_threads)
        module.train(was_training)
        with torch.no_grad():
            for key, b in module.named_buffers():
                if key in buffers:
                    b.copy_(buffers[key])
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), first.dtype)
    return Profile(
        model=name,
        batch_size=int(first.shape[0]),
        layers=layers,
        input_shape=tuple(int(d) for d in first.shape[1:]),
        dtype=str(dtype).removeprefix("torch."),
        device=first.device.type,
        source="planner",
        torch_version=torch.__version__,
        graph_hash=graph.graph_hash,
        threads=n_threads,
        warmup=warmup,
        reps=reps,
        whole_step_ms=whole_ms,
        calibration=calibration,
        timer={time.perf_counter: "wall", time.process_time: "cpu"}.get(clock),
        backward_split="measured" if split_backward else None,
        leaf_modules=tuple(leaf_modules),
        allocator=None if first.device.type != "cpu" else "keep-freed" if kept else "default",
        device_name=(
            torch.cuda.get_device_name(first.device) if first.device.type == "cuda" else None
        ),
        machine=machine_description(first.device),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def machine_description(device: torch.device | str = "cpu") -> str:
    """A line naming the machine: CPU model and cores, OS, and the GPU when measuring on one.

    Example:
        >>> "logical cores" in machine_description()
        True
    """
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}"
    device = torch.device(device)
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


# --- the procedure -------------------------------------------------------------------------


def _measure(
    graph: CapturedGraph,
    inputs: tuple[torch.Tensor, ...],
    warmup: int,
    reps: int,
    timer: Timer,
    progress: bool,
    name: str,
    calibrate: bool,
    split_backward: bool = False,
) -> tuple[tuple[LayerProfile, ...], float, str | None]:
    """Steps 2-5 of the module docstring: the layers, the whole-step median, the calibration."""
    # One bar through every phase (warm-up and recording steps, layers, whole steps): a large
    # model's single step can take minutes, and a silent terminal looks hung.
    with tqdm(
        total=max(warmup, 1) + min(reps, 2) * len(graph.layers) + 1,
        desc=f"profiling {name}: warm-up",
        unit="op",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    ) as bar:
        for _ in range(warmup - 1):
            whole_step(graph.module, inputs, timer)
            bar.update()
        bar.set_description(f"profiling {name}: recording")
        recording = record(graph, inputs, backward=warmup > 0)
        bar.update()
        sizes = layer_sizes(graph, inputs, recording)
        ones = GradOnes()
        runners = [LayerRunner(graph.module, layer, recording, ones) for layer in graph.layers]
        bar.set_description(f"profiling {name}: layers")
        pending = runners
        for done in range(reps):
            if done >= 2:
                # Further repetitions only for layers whose samples do not yet agree.
                pending = [r for r in pending if not r.settled()]
                bar.total += len(pending)
                bar.refresh()
            for runner in pending:
                runner.run(timer)
                bar.update()
        splits: list[tuple[float, float]] | None = None
        if split_backward:
            bar.set_description(f"profiling {name}: backward split")
            raw_backward = [statistics.median(r.backward_ms) for r in runners]
            splits = time_split(runners, raw_backward, min(reps, 2), timer, bar)
        # Free the recorded activations first, so the whole step reuses their memory instead
        # of touching (page-faulting) as much again.
        recording.values.clear()
        layer_ms = sum(
            statistics.median(r.forward_ms) + statistics.median(r.backward_ms) for r in runners
        )
        bar.set_description(f"profiling {name}: whole step")
        whole = [whole_step(graph.module, inputs, timer)]
        bar.update()
        # One whole step checks the sum; only a disagreement earns more samples (up to reps),
        # so one disturbed sample cannot trigger a calibration.
        while len(whole) < reps and _disagree(layer_ms, _median_total(whole)):
            bar.total += 1
            whole.append(whole_step(graph.module, inputs, timer))
            bar.update()
    fwd = [statistics.median(r.forward_ms) for r in runners]
    bwd = [statistics.median(r.backward_ms) for r in runners]
    whole_fwd = statistics.median(f for f, _ in whole)
    whole_bwd = statistics.median(b for _, b in whole)
    whole_ms = _median_total(whole)
    total = sum(fwd) + sum(bwd)
    calibration = None
    if calibrate and total > 0 and _disagree(total, whole_ms):
        # Split the whole step as its own forward and backward medians split, then scale the
        # layers' forward and backward times separately so their sum is the whole step.
        fwd_share = whole_fwd / (whole_fwd + whole_bwd) if whole_fwd + whole_bwd > 0 else 0.5
        if sum(fwd) > 0 and sum(bwd) > 0:
            f_scale = whole_ms * fwd_share / sum(fwd)
            b_scale = whole_ms * (1 - fwd_share) / sum(bwd)
        else:
            f_scale = b_scale = whole_ms / total
        fwd = [t * f_scale for t in fwd]
        bwd = [t * b_scale for t in bwd]
        calibration = (
            f"per-layer medians summed to {total:.3f} ms against a whole step of {whole_ms:.3f} ms "
            f"(ratio {total / whole_ms:.3f}); forward times scaled by {f_scale:.4f} and backward "
            f"times by {b_scale:.4f}, splitting the whole step as its forward ({whole_fwd:.3f} ms) "
            f"and backward ({whole_bwd:.3f} ms) medians split; *_samples_ms are unscaled"
        )
    layers = tuple(
        LayerProfile(
            name=layer.name,
            op=layer.op,
            forward_ms=fwd[i],
            backward_ms=bwd[i],
            output_bytes=sizes[i].output_bytes,
            parameter_bytes=sizes[i].parameter_bytes,
            inputs=layer.inputs,
            saved_bytes=sizes[i].saved_bytes,
            buffer_bytes=sizes[i].buffer_bytes,
            target=layer.target,
            forward_samples_ms=tuple(runners[i].forward_ms),
            backward_samples_ms=tuple(runners[i].backward_ms),
            backward_input_ms=None if splits is None else splits[i][0],
            backward_weight_ms=None if splits is None else splits[i][1],
        )
        for i, layer in enumerate(graph.layers)
    )
    return layers, whole_ms, calibration


def measure_backward_split(
    profile: Profile,
    module: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    reps: int = 2,
    clock: Clock = time.perf_counter,
    progress: bool = False,
) -> Profile:
    """``profile`` (of ``module`` on ``inputs``) with each layer's backward measured as input
    gradient (B) and weight gradient (W), for a profile taken without ``split_backward``.

    It costs one more recording step (capture, forward and backward) than profiling with
    ``profile_module(..., split_backward=True)``, which measures the split on the recording it
    times the layers on; the measurement itself is the same (:func:`~planner.profile.timing.time_split`). The module's
    mode, buffers and threads are restored.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
        >>> x = (torch.randn(2, 4),)
        >>> p = measure_backward_split(profile_module(net, x, reps=1), net, x, reps=1)
        >>> p.backward_split, p.layers[0].backward_input_ms, p.layers[1].backward_weight_ms
        ('measured', 0.0, 0.0)

    Raises:
        ProfileError: ``module`` does not trace to the graph of ``profile``, or ``reps < 1``.
    """
    import dataclasses

    if reps < 1:
        raise ProfileError(f"need reps >= 1 to measure the backward split, got {reps}")
    inputs = tuple(inputs)
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    timer = Timer(clock, device)
    old_threads, was_training = torch.get_num_threads(), module.training
    buffers = {key: b.detach().clone() for key, b in module.named_buffers()}
    memory = keep_freed_memory() if device.type == "cpu" else contextlib.nullcontext()
    try:
        torch.set_num_threads(profile.threads or old_threads)
        module.train()
        graph = capture(module, profile.leaf_modules)
        if profile.graph_hash is not None and graph.graph_hash != profile.graph_hash:
            raise ProfileError(
                f"the module traces to graph {graph.graph_hash}, the profile is of "
                f"{profile.graph_hash}; measure the split on the profiled model"
            )
        if len(graph.layers) != len(profile.layers):
            raise ProfileError(
                f"the module traces to {len(graph.layers)} layers, the profile has "
                f"{len(profile.layers)}; measure the split on the profiled model"
            )
        with (
            memory,
            tqdm(
                desc=f"profiling {profile.model}: backward split",
                unit="op",
                file=sys.stderr,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            recording = record(graph, inputs, backward=True)
            ones = GradOnes()
            runners = [LayerRunner(graph.module, layer, recording, ones) for layer in graph.layers]
            splits = time_split(
                runners, [layer.backward_ms for layer in profile.layers], reps, timer, bar
            )
            recording.values.clear()
    finally:
        torch.set_num_threads(old_threads)
        module.train(was_training)
        with torch.no_grad():
            for key, buf in module.named_buffers():
                if key in buffers:
                    buf.copy_(buffers[key])
    layers = tuple(
        dataclasses.replace(layer, backward_input_ms=b, backward_weight_ms=w)
        for layer, (b, w) in zip(profile.layers, splits, strict=True)
    )
    return dataclasses.replace(profile, layers=layers, backward_split="measured")


def _disagree(layer_sum_ms: float, whole_ms: float) -> bool:
    """Whether the per-layer sum is off the whole step by more than :data:`SUM_TOLERANCE`."""
    return whole_ms > 0 and abs(layer_sum_ms / whole_ms - 1) > SUM_TOLERANCE


def _median_total(samples: list[tuple[float, float]]) -> float:
    return statistics.median(f + b for f, b in samples)
