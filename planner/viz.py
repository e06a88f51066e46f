"""Pictures of a plan: the Gantt chart of a simulated run, the stage partition, the memory.

Each ``*_figure`` function returns a matplotlib :class:`~matplotlib.figure.Figure` (no pyplot
state, so it works headless and in notebooks); each ``draw_*`` writes one as a PNG atomically
(a temporary file, then a rename).

Example:
    >>> import tempfile, os
    >>> from planner.schedules import Schedule
    >>> from planner.simulate import SimStage, simulate_stages
    >>> r = simulate_stages([SimStage(forward_s=1e-3, backward_s=2e-3, ranks=(s,)) for s in range(4)],
    ...                     schedule=Schedule.ONE_F_ONE_B, microbatches=8, minibatches=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "gantt.png")
    >>> draw_gantt(r, path)
    >>> os.path.getsize(path) > 10_000
    True
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from planner._io import atomic_write_bytes
from planner.plan import Plan
from planner.profile.format import Profile
from planner.schedules import Schedule
from planner.simulate import COMPUTE_KINDS, DeviceStats, SimulationResult

__all__ = [
    "COLORS",
    "default_until_s",
    "draw_gantt",
    "draw_memory",
    "draw_partition",
    "gantt_figure",
    "memory_figure",
    "partition_figure",
    "save_png",
]

COLORS = {
    "forward": "#5B9BD5",
    "backward": "#ED7D31",
    "backward_input": "#C55A11",
    "backward_weight": "#FFC000",
    "communication": "#70AD47",
    "allreduce": "#8E6BB8",
    "update": "#7F7F7F",
    "idle": "#F2F2F2",
    "limit": "#C00000",
}
_STAGE_COLORS = (
    "#4E79A7",
    "#F28E2B",
    "#59A14F",
    "#E15759",
    "#76B7B2",
    "#EDC948",
    "#B07AA1",
    "#FF9DA7",
    "#9C755F",
    "#BAB0AC",
)
_HATCH = {"backward_weight": "////"}
_LEGEND = {
    "forward": "forward",
    "backward": "backward",
    "backward_input": "backward, input gradient (B)",
    "backward_weight": "backward, weight gradient (W)",
    "update": "optimizer step",
}
_GIB = 1024**3
_DPI = 100


def save_png(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Write ``fig`` as a PNG atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    atomic_write_bytes(path, buffer.getvalue())


# --- Gantt chart ---------------------------------------------------------------------------


def default_until_s(result: SimulationResult) -> float:
    """How much of a run the Gantt chart shows: two minibatches of a flushed schedule (the flush
    between them visible); for ``pipedream`` the fill and some steady state (up to the minibatch
    of microbatch ``devices + 8``)."""
    events = result.events
    done = events.groupby("minibatch", observed=True)["end_s"].max().sort_index().to_numpy()
    if result.schedule is Schedule.PIPEDREAM:
        shown = len(result.devices) + 8
        k = min(len(done), math.ceil(shown / result.microbatches)) - 1
    else:
        k = min(len(done), 2) - 1
    return float(done[k])


def gantt_figure(
    result: SimulationResult, *, title: str | None = None, until_s: float | None = None
) -> Figure:
    """The timeline of a simulated run: one row per device, time in ms.

    Forwards and backwards are full-height bars numbered by microbatch (counted within each
    minibatch for the flushed schedules, over the run for ``pipedream``), incoming transfers a
    thin strip under them, all-reduces their own colour; white is idle (the bubble, whose share in
    the steady state is printed at the right). Dashed lines mark the ends of minibatches. Under
    ``zb-h1``/``zbv`` the backward is two bars, B (input gradient, dark orange) and W (weight
    gradient, hatched gold); with several chunks per rank (``interleaved-1f1b``, ``zbv``) a
    letter names the chunk (``a3``: microbatch 3 of the rank's first chunk, ``b3`` of its
    second; later chunks are drawn lighter) and the row names the rank's stages.

    Example:
        >>> fig = gantt_figure(result)                      # doctest: +SKIP
        >>> fig.savefig("gantt.png")                        # doctest: +SKIP

    Args:
        result: A simulation.
        title: The title; by default the schedule, devices, microbatches and samples/s.
        until_s: Show events starting before this time; default :func:`default_until_s`.
    """
    until_s = default_until_s(result) if until_s is None else until_s
    devices = sorted(result.devices, key=lambda d: (d.stage, d.replica))
    row_of = {d.rank: i for i, d in enumerate(devices)}
    events = result.events[result.events["start_s"] < until_s]
    n = len(devices)
    height = min(1.8 + 0.42 * n, 14.0)
    fig = Figure(figsize=(12, height), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    to_ms = 1e3
    x_max = until_s * to_ms
    ax.set_xlim(0, x_max * 1.0)
    ax.set_ylim(n - 0.5, -0.5)
    for i in range(n):
        ax.axhspan(i - 0.4, i + 0.4, color=COLORS["idle"], zorder=0, lw=0)
    width_px = fig.get_figwidth() * _DPI * 0.8
    ms_per_px = x_max / width_px
    font = 7 if n <= 24 else 5
    kinds = [k for k in COMPUTE_KINDS if (events["kind"] == k).any()]
    chunk_of = {(d.rank, s): c for d in devices for c, s in enumerate(d.stages or (d.stage,))}
    for kind in kinds:
        rows = events[events["kind"] == kind]
        y = rows["rank"].map(row_of).to_numpy()
        start = rows["start_s"].to_numpy() * to_ms
        dur = (rows["end_s"].to_numpy() - rows["start_s"].to_numpy()) * to_ms
        chunks = np.asarray(
            [chunk_of[(r, s)] for r, s in zip(rows["rank"], rows["stage"], strict=True)],
            dtype=np.int64,
        )
        for c in np.unique(chunks):
            mine = chunks == c
            ax.barh(
                y[mine] - 0.05,
                dur[mine],
                left=start[mine],
                height=0.6,
                color=_lighter(COLORS[kind], c / result.chunks),
                edgecolor="white",
                hatch=_HATCH.get(kind),
                linewidth=0.4,
                zorder=2,
            )
        numbers = rows["microbatch"].to_numpy()
        if result.schedule is not Schedule.PIPEDREAM:
            numbers = (
                numbers % result.microbatches
            )  # within the minibatch; the flush separates them
        for yy, s0, d, m, c in zip(y, start, dur, numbers, chunks, strict=True):
            label = f"{'abcdefghijklmnopqrstuvwxyz'[c % 26]}{m}" if result.chunks > 1 else str(m)
            if d / ms_per_px >= 5.5 * len(label) + 3 and s0 + d / 2 < x_max:
                ax.text(
                    s0 + d / 2,
                    yy - 0.05,
                    label,
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if kind in ("backward", "backward_input") else "black",
                    zorder=3,
                    clip_on=True,
                )
    recv = events[events["kind"] == "recv"]
    if len(recv):
        ax.barh(
            recv["rank"].map(row_of).to_numpy() + 0.32,
            (recv["end_s"] - recv["start_s"]).to_numpy() * to_ms,
            left=recv["start_s"].to_numpy() * to_ms,
            height=0.12,
            color=COLORS["communication"],
            linewidth=0,
            zorder=2,
        )
    reduce = events[events["kind"] == "allreduce"]
    if len(reduce):
        ax.barh(
            reduce["rank"].map(row_of).to_numpy() - 0.05,
            (reduce["end_s"] - reduce["start_s"]).to_numpy() * to_ms,
            left=reduce["start_s"].to_numpy() * to_ms,
            height=0.6,
            color=COLORS["allreduce"],
            edgecolor="white",
            linewidth=0.4,
            zorder=2,
        )
    if result.schedule is not Schedule.PIPEDREAM:
        ends = events.groupby("minibatch", observed=True)["end_s"].max().to_numpy() * to_ms
        for end in ends[ends <= x_max * 1.0001]:
            ax.axvline(end, color="#404040", lw=0.8, ls="--", zorder=1)
    ax.set_yticks(range(n), [_device_label(d) for d in devices], fontsize=8 if n <= 24 else 6)
    right = ax.secondary_yaxis("right")
    right.set_yticks(
        range(n), [f"idle {d.idle_fraction:.0%}" for d in devices], fontsize=8 if n <= 24 else 6
    )
    right.tick_params(length=0)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", color="#D0D0D0", lw=0.5, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles: list[Artist] = [
        Patch(
            facecolor=COLORS[k],
            edgecolor="white" if k in _HATCH else COLORS[k],
            hatch=_HATCH.get(k),
            label=_LEGEND[k],
        )
        for k in kinds
    ]
    if result.chunks > 1:
        handles.append(
            Patch(
                color=_lighter(COLORS["forward"], 1 / result.chunks),
                label="lighter: a later chunk (a, b, ...)",
            )
        )
    if len(recv):
        handles.append(
            Patch(color=COLORS["communication"], label="transfer in (activations / gradients)")
        )
    if len(reduce):
        handles.append(Patch(color=COLORS["allreduce"], label="gradient all-reduce"))
    handles.append(Patch(facecolor=COLORS["idle"], edgecolor="#BBBBBB", label="idle (bubble)"))
    if result.schedule is not Schedule.PIPEDREAM:
        handles.append(
            Line2D([], [], color="#404040", lw=0.8, ls="--", label="end of minibatch (flush)")
        )
    fig.legend(  # at most 4 a row: the split-backward legend is wider than the figure in one row
        handles=handles,
        loc="outside lower center",
        ncol=min(len(handles), 4),
        fontsize=8,
        frameon=False,
    )
    if title is None:
        per_rank = f" x {result.chunks} chunks" if result.chunks > 1 else ""
        title = (
            f"{result.schedule} schedule, {len(result.devices)} devices{per_rank}, "
            f"{result.microbatches} microbatches per minibatch: "
            f"{result.samples_per_s:,.1f} samples/s simulated "
            f"({result.minibatch_s * 1e3:,.1f} ms per minibatch)"
        )
    ax.set_title(title, fontsize=10, loc="left")
    return fig


def draw_gantt(
    result: SimulationResult,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    until_s: float | None = None,
) -> None:
    """Write the Gantt chart of :func:`gantt_figure` to ``path`` as a PNG.

    Example:
        >>> draw_gantt(simulate(plan, profile), "gantt.png")   # doctest: +SKIP
    """
    save_png(gantt_figure(result, title=title, until_s=until_s), path)


# --- stage partition -----------------------------------------------------------------------


def partition_figure(plan: Plan, profile: Profile, *, title: str | None = None) -> Figure:
    """The partition: per-layer compute in layer order, coloured by stage, with each stage's time.

    The top panel shows forward+backward time of every layer (for one microbatch), stage
    boundaries as lines and each stage's replication; the bottom one each stage's time per
    microbatch on one replica and divided by its replicas (what the pipeline's rate sees).

    Example:
        >>> partition_figure(plan, profile).savefig("partition.png")   # doctest: +SKIP
    """
    scaled = profile.rescale(plan.microbatch_size)
    groups = plan.stage_layer_indices(scaled)
    compute = np.array([layer.compute_ms for layer in scaled.layers])
    fig = Figure(figsize=(12, 5.2), dpi=_DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 2))
    x = np.arange(len(compute))
    colors = np.empty(len(compute), dtype=object)
    for s, indices in enumerate(groups):
        colors[indices] = _STAGE_COLORS[s % len(_STAGE_COLORS)]
    top.bar(x, compute, width=1.0 if len(x) > 60 else 0.8, color=list(colors), linewidth=0)
    ymax = float(compute.max()) * 1.35 if len(compute) else 1.0
    top.set_ylim(0, ymax)
    top.set_xlim(-0.5, len(x) - 0.5)
    for s, indices in enumerate(groups):
        lo, hi = min(indices) - 0.5, max(indices) + 0.5
        if s:
            top.axvline(lo, color="#303030", lw=1.0)
        stage = plan.stages[s]
        label = f"stage {s}\n{compute[indices].sum():.1f} ms" + (
            f"\n×{stage.replicas}" if stage.replicas > 1 else ""
        )
        top.text(
            (lo + hi) / 2,
            ymax * 0.97,
            label,
            ha="center",
            va="top",
            fontsize=8,
            fontweight="bold" if stage.replicas > 1 else "normal",
        )
    top.set_ylabel("forward + backward\n(ms per microbatch)")
    top.set_xlabel(f"layer (profile order, {len(x)} layers)")
    for side in ("top", "right"):
        top.spines[side].set_visible(False)
    per_replica = np.array([compute[idx].sum() for idx in groups])
    replicas = np.array([stage.replicas for stage in plan.stages])
    effective = per_replica / replicas
    xs = np.arange(len(groups))
    bottom.bar(xs, per_replica, color="#D9D9D9", label="one replica")
    bottom.bar(
        xs,
        effective,
        color=[_STAGE_COLORS[s % len(_STAGE_COLORS)] for s in xs],
        label="÷ replicas (pipeline's view)",
    )
    for s in range(len(groups)):
        ranks = plan.stages[s].ranks
        text = f"×{replicas[s]}\nranks {_ranks(ranks)}" if replicas[s] > 1 else f"rank {ranks[0]}"
        bottom.text(s, per_replica[s], text, ha="center", va="bottom", fontsize=7)
    bottom.set_ylim(0, float(per_replica.max()) * 1.45)
    bottom.set_xticks(xs, [f"stage {s}" for s in xs], fontsize=8)
    bottom.set_ylabel("stage compute\n(ms per microbatch)")
    bottom.axhline(float(effective.max()), color="#303030", lw=0.8, ls=":")
    bottom.legend(fontsize=8, frameon=False, loc="upper right")
    for side in ("top", "right"):
        bottom.spines[side].set_visible(False)
    if title is None:
        used = sum(stage.replicas for stage in plan.stages)
        title = (
            f"{plan.profile.model}: {len(plan.stages)} stages on {used} devices "
            f"({plan.schedule}, microbatch {plan.microbatch_size})"
        )
    top.set_title(title, fontsize=10, loc="left")
    return fig


def draw_partition(
    plan: Plan, profile: Profile, path: str | os.PathLike[str], *, title: str | None = None
) -> None:
    """Write the partition picture of :func:`partition_figure` to ``path`` as a PNG.

    Example:
        >>> draw_partition(plan, profile, "partition.png")   # doctest: +SKIP
    """
    save_png(partition_figure(plan, profile, title=title), path)


# --- memory --------------------------------------------------------------------------------


def memory_figure(
    result: SimulationResult, *, title: str | None = None, until_s: float | None = None
) -> Figure:
    """Memory per device: over time (left; at most 8 devices, those with the highest peaks) and
    the peak of every device against the device memory (right).

    Example:
        >>> memory_figure(result).savefig("memory.png")   # doctest: +SKIP
    """
    until_s = default_until_s(result) if until_s is None else until_s
    devices = sorted(result.devices, key=lambda d: (d.stage, d.replica))
    fig = Figure(figsize=(12, 4.6), dpi=_DPI, layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    memory = result.memory
    base = memory.groupby("rank")["bytes"].first()
    traced = sorted(devices, key=lambda d: -d.peak_memory_bytes)[:8]
    for d in sorted(traced, key=lambda d: (d.stage, d.replica)):
        trace = memory[memory["rank"] == d.rank]
        t = np.append(trace["time_s"].to_numpy(), until_s) * 1e3
        v = np.append(trace["bytes"].to_numpy(), trace["bytes"].iloc[-1]) / _GIB
        keep = t <= until_s * 1e3
        last = int(np.argmin(keep)) if not keep.all() else len(t)
        t = np.append(t[:last], until_s * 1e3)
        v = np.append(v[:last], v[max(last - 1, 0)])
        color = _STAGE_COLORS[d.stage % len(_STAGE_COLORS)]
        style = "-" if d.replica == 0 else ":"
        left.step(
            t,
            v,
            where="post",
            color=color,
            lw=1.2,
            ls=style,
            label=_device_label(d),
        )
    left.set_xlim(0, until_s * 1e3)
    left.set_xlabel("time (ms)")
    left.set_ylabel("memory (GiB)")
    left.set_ylim(0, None)
    left.legend(
        fontsize=7,
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        title=None if len(traced) == len(devices) else "highest peaks",
        title_fontsize=7,
    )
    peaks = np.array([d.peak_memory_bytes for d in devices]) / _GIB
    static = np.array([base[d.rank] for d in devices]) / _GIB
    y = np.arange(len(devices))
    right.barh(y, static, color="#A5A5A5", label="weights, gradients, optimizer state")
    right.barh(
        y,
        peaks - static,
        left=static,
        color=[_STAGE_COLORS[d.stage % len(_STAGE_COLORS)] for d in devices],
        label="activations in flight (+ stashed weights)",
    )
    right.set_yticks(
        y,
        [_device_label(d) for d in devices],
        fontsize=8 if len(devices) <= 24 else 6,
    )
    right.set_ylim(len(devices) - 0.5, -0.5)
    right.set_xlabel("peak memory (GiB)")
    limit = result.memory_limit_bytes
    if limit is not None:
        right.axvline(
            limit / _GIB,
            color=COLORS["limit"],
            lw=1.5,
            ls="--",
            label=f"device memory {limit / _GIB:.3g} GiB",
        )
        if limit / _GIB <= 1.5 * max(float(peaks.max()), 1e-9):
            left.axhline(limit / _GIB, color=COLORS["limit"], lw=1.5, ls="--")
    right.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    for ax in (left, right):
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    if title is None:
        title = f"memory per device ({result.schedule}, {result.microbatches} microbatches per minibatch)"
    left.set_title(title, fontsize=10, loc="left")
    return fig


def draw_memory(
    result: SimulationResult,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    until_s: float | None = None,
) -> None:
    """Write the memory chart of :func:`memory_figure` to ``path`` as a PNG.

    Example:
        >>> draw_memory(simulate(plan, profile), "memory.png")   # doctest: +SKIP
    """
    save_png(memory_figure(result, title=title, until_s=until_s), path)


def _lighter(color: str, amount: float) -> str:
    """``color`` blended ``amount`` (0..1) of the way to white, at most 60%."""
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    mix = min(max(amount, 0.0), 1.0) * 0.6
    return "#" + "".join(f"{round(v + (255 - v) * mix):02X}" for v in rgb)


def _device_label(d: DeviceStats) -> str:
    if len(d.stages) > 1:
        return f"rank {d.rank} / stages {','.join(str(s) for s in d.stages)}"
    return f"rank {d.rank} / stage {d.stage}"


def _ranks(ranks: tuple[int, ...]) -> str:
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(str(r) for r in ranks)
