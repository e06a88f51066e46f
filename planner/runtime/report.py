"""The run report: per rank and per stage, where the time went; per step, loss and throughput.

Written as JSON (``"format": "planner.runtime-report/1"``) beside the plan, atomically. Times are
seconds summed over the measured steps; the first step (warm-up: allocation, first connections)
is left out of the totals when the run has more than one step.

- ``compute_s``: forwards, backwards and losses of the stage's microbatches;
- ``wait_s``: blocked waiting for an activation or gradient to arrive (pipeline bubbles plus
  transfer time not hidden behind compute);
- ``send_s``: posting sends and waiting for them to complete at the flush;
- ``sync_s``: all-reducing gradients among replicas (and across stages for tied parameters);
- ``update_s``: the optimizer step;
- ``other_s``: the rest of the wall time (data, bookkeeping).

Example:
    >>> r = RankStats(rank=0, stage=0, replica=0, microbatches_per_step=2, samples_per_step=8,
    ...               steps=2, wall_s=1.0, compute_s=0.5, wait_s=0.2, send_s=0.1, sync_s=0.0,
    ...               update_s=0.1, bytes_sent=10, bytes_received=0)
    >>> round(r.other_s, 3), r.samples_per_s
    (0.1, 16.0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from planner._io import (
    Outputs,
    atomic_write_text,
    check_output_folder,
    check_outputs,
    printable,
    validate,
)

if TYPE_CHECKING:
    from planner.plan import Plan
    from planner.runtime.config import RunConfig

__all__ = [
    "FORMAT",
    "Comparison",
    "RankStats",
    "RunReport",
    "StageComparison",
    "StageStats",
    "StepStats",
    "check_run_outputs",
]

FORMAT = "planner.runtime-report/1"


@dataclass(frozen=True, kw_only=True)
class RankStats:
    """One rank's measured time over the run's measured steps (seconds).

    Attributes:
        rank: Global rank.
        stage: Its stage.
        replica: Which replica of the stage.
        microbatches_per_step: Microbatches it runs per minibatch.
        samples_per_step: Samples it runs per minibatch.
        steps: Measured steps.
        wall_s: Wall time of the measured steps.
        compute_s: Forward, backward and loss.
        wait_s: Blocked on receives.
        send_s: Posting sends and waiting for them.
        sync_s: Gradient all-reduce.
        update_s: Optimizer step.
        bytes_sent: Bytes sent point-to-point.
        bytes_received: Bytes received point-to-point.
        max_weight_versions: Most weight versions stashed at once (``pipedream``; else 0).
        weight_version_limit: The most the schedule allows (``S - s`` unreplicated; else 0).
    """

    rank: int
    stage: int
    replica: int
    microbatches_per_step: int
    samples_per_step: int
    steps: int
    wall_s: float
    compute_s: float
    wait_s: float
    send_s: float
    sync_s: float
    update_s: float
    bytes_sent: int
    bytes_received: int
    max_weight_versions: int = 0
    weight_version_limit: int = 0

    @property
    def other_s(self) -> float:
        return (
            self.wall_s - self.compute_s - self.wait_s - self.send_s - self.sync_s - self.update_s
        )

    @property
    def samples_per_s(self) -> float:
        """Samples this rank processed per second of wall time."""
        return self.samples_per_step * self.steps / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class StageStats:
    """A stage's replicas together: mean times per step over replicas, summed samples/s."""

    stage: int
    ranks: tuple[int, ...]
    compute_s_per_step: float
    wait_s_per_step: float
    send_s_per_step: float
    sync_s_per_step: float
    update_s_per_step: float
    samples_per_s: float

    @classmethod
    def of(cls, stage: int, ranks: list[RankStats]) -> StageStats:
        n = len(ranks)

        def mean(attr: str) -> float:
            return sum(getattr(r, attr) / max(r.steps, 1) for r in ranks) / n

        return cls(
            stage=stage,
            ranks=tuple(r.rank for r in ranks),
            compute_s_per_step=mean("compute_s"),
            wait_s_per_step=mean("wait_s"),
            send_s_per_step=mean("send_s"),
            sync_s_per_step=mean("sync_s"),
            update_s_per_step=mean("update_s"),
            samples_per_s=sum(r.samples_per_s for r in ranks),
        )


@dataclass(frozen=True, kw_only=True)
class StepStats:
    """One optimizer step as seen by the first replica of the last stage."""

    step: int
    loss: float
    wall_s: float
    samples_per_s: float


@dataclass(frozen=True, kw_only=True)
class StageComparison:
    """One stage, predicted (simulator, plan) beside measured; per step, per replica.

    Attributes:
        stage: The stage.
        predicted_compute_ms: Forwards and backwards of the replica's microbatches.
        measured_compute_ms: The same, measured.
        predicted_comm_ms: Transfers in and out of the stage (the plan's ``comm_s`` per
            microbatch times the replica's microbatches).
        measured_comm_ms: Time in sends (posting and completion) measured.
        predicted_idle: Share of the time idle (bubble) in the simulator's steady state.
        measured_idle: Share of wall time not computing, all-reducing or updating.
    """

    stage: int
    predicted_compute_ms: float
    measured_compute_ms: float
    predicted_comm_ms: float
    measured_comm_ms: float
    predicted_idle: float
    measured_idle: float


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """Predicted against measured, per stage and for the whole run."""

    stages: tuple[StageComparison, ...]
    predicted_samples_per_s: float
    measured_samples_per_s: float

    def describe(self) -> str:
        """The table ``plan run`` ends with."""
        lines = [
            "predicted vs measured, per step and replica (pred / meas):",
            "stage    compute ms           comm ms         idle",
        ]
        for c in self.stages:
            lines.append(
                f"{c.stage:>5}  {c.predicted_compute_ms:>7.2f} / {c.measured_compute_ms:<7.2f}  "
                f"{c.predicted_comm_ms:>6.2f} / {c.measured_comm_ms:<6.2f}  "
                f"{c.predicted_idle:>4.0%} / {c.measured_idle:<4.0%}"
            )
        ratio = (
            self.measured_samples_per_s / self.predicted_samples_per_s
            if self.predicted_samples_per_s > 0
            else float("nan")
        )
        lines.append(
            f"samples/s: predicted {self.predicted_samples_per_s:.1f}, measured "
            f"{self.measured_samples_per_s:.1f} ({ratio:.2f}x the prediction)"
        )
        return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class RunReport:
    """What a run measured.

    Attributes:
        plan: The plan's path.
        model: The model spec.
        schedule: The schedule run.
        world_size: Processes in the run.
        minibatch_size: Samples per step.
        microbatches: Microbatches per step.
        steps: Steps run.
        measured_steps: Steps in the totals (all but the first when there are several).
        samples_per_s: Minibatch size over mean measured step time.
        losses: Loss of every step.
        step_stats: Every step's loss and time.
        ranks: Per-rank totals.
        stages: Per-stage summaries.
        backend: torch.distributed backend.
        threads: CPU threads per process.
        torch_version: torch version.
        comparison: Predicted against measured, when the plan's profile could be found.
    """

    plan: str
    model: str
    schedule: str
    world_size: int
    minibatch_size: int
    microbatches: int
    steps: int
    measured_steps: int
    samples_per_s: float
    losses: tuple[float, ...]
    step_stats: tuple[StepStats, ...]
    ranks: tuple[RankStats, ...]
    stages: tuple[StageStats, ...]
    backend: str
    threads: int
    torch_version: str
    comparison: Comparison | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready document; a loss that is not finite (a diverged run) is ``None``."""
        doc = dataclasses.asdict(self)
        doc["losses"] = [_finite_or_none(x) for x in self.losses]
        for step in doc["step_stats"]:
            step["loss"] = _finite_or_none(step["loss"])
        for rank, stats in zip(doc["ranks"], self.ranks, strict=True):
            rank["other_s"] = stats.other_s
            rank["samples_per_s"] = stats.samples_per_s
        return {"format": FORMAT, **doc}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the report atomically (temporary file, then rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, doc: Any, what: str = "report") -> RunReport:
        """Read a report document back (as :meth:`to_dict` wrote it).

        Raises:
            RunError: Not a runtime report, or a field missing, of the wrong type or out of range.
        """
        from planner.runtime.config import RunError

        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RunError(
                f"{what} is not a runtime report (format {FORMAT!r}); "
                "pass the .report.json that `plan run` wrote"
            )
        validate(doc, "runtime-report", RunError, what)
        doc = {
            **doc,
            "losses": [_nan_if_none(x) for x in doc["losses"]],
            "step_stats": [{**s, "loss": _nan_if_none(s["loss"])} for s in doc["step_stats"]],
        }
        try:
            fields = {f.name for f in dataclasses.fields(RankStats)}
            comparison = doc.get("comparison")
            return cls(
                **{
                    **{k: v for k, v in doc.items() if k not in ("format", "comparison")},
                    "losses": tuple(doc["losses"]),
                    "step_stats": tuple(StepStats(**s) for s in doc["step_stats"]),
                    "ranks": tuple(
                        RankStats(**{k: v for k, v in r.items() if k in fields})
                        for r in doc["ranks"]
                    ),
                    "stages": tuple(
                        StageStats(**{**s, "ranks": tuple(s["ranks"])}) for s in doc["stages"]
                    ),
                    "comparison": None
                    if comparison is None
                    else Comparison(
                        stages=tuple(StageComparison(**c) for c in comparison["stages"]),
                        predicted_samples_per_s=comparison["predicted_samples_per_s"],
                        measured_samples_per_s=comparison["measured_samples_per_s"],
                    ),
                }
            )
        except (KeyError, TypeError) as exc:
            raise RunError(
                f"{what} is incomplete or damaged ({exc}); run `plan run` again"
            ) from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunReport:
        """Read a report file."""
        from planner._io import load_json
        from planner.runtime.config import RunError

        return cls.from_dict(load_json(path, RunError, "report"), f"report {os.fspath(path)}")

    def describe(self) -> str:
        """A per-stage table of where the time went, per step."""
        cols = (
            "stage",
            "ranks",
            "compute ms",
            "wait ms",
            "send ms",
            "sync ms",
            "update ms",
            "samples/s",
        )
        rows = [
            (
                str(s.stage),
                ",".join(map(str, s.ranks)),
                f"{s.compute_s_per_step * 1e3:.1f}",
                f"{s.wait_s_per_step * 1e3:.1f}",
                f"{s.send_s_per_step * 1e3:.1f}",
                f"{s.sync_s_per_step * 1e3:.1f}",
                f"{s.update_s_per_step * 1e3:.1f}",
                f"{s.samples_per_s:.1f}",
            )
            for s in self.stages
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.append(
            f"{printable(self.schedule)}, {self.measured_steps} measured steps: "
            f"{self.samples_per_s:.1f} samples/s (per-stage times are per step)"
        )
        return "\n".join(lines)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def check_run_outputs(config: RunConfig, plan: Plan) -> Outputs:
    """Refuse, before any rank starts, a report or checkpoint folder the run could not write.

    The report must not be the plan, its profile or the data, nor sit where no file can be
    written; ``--checkpoint-dir`` must be a folder (or creatable as one) that takes new files.
    Only the launching process checks: the ranks write what it checked.

    Raises:
        RunError: Which option, what is wrong with it, and what to do.
    """
    from planner.errors import PlanError
    from planner.plan import find_profile_file
    from planner.runtime.config import RunError

    inputs: list[tuple[str, str | os.PathLike[str]]] = [("plan", config.plan_path)]
    with contextlib.suppress(PlanError):  # without it the run has no predicted-vs-measured table
        inputs.append(("plan's profile", find_profile_file(plan, config.plan_path)))
    if config.data != "synthetic":
        inputs.append(("--data", config.data))
    option = (
        "--report"
        if config.report_path is not None
        else "the report (beside the plan; or --report)"
    )
    outputs = check_outputs([(option, config.report_file)], inputs=inputs, error=RunError)
    if config.checkpoint_dir is not None:
        check_output_folder(
            "--checkpoint-dir",
            config.checkpoint_dir,
            inputs=[*inputs, ("report", config.report_file)],
            error=RunError,
        )
    return outputs
