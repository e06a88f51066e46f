"""The plan: stages, replicas, ranks and predictions, and its JSON file ``planner.plan/1``.

A plan is what the optimizer decides and what the simulator and the runtime consume unchanged.
It records where it came from (the profile's path and sha256, the topology, the choices) so a
plan can be checked against its profile and re-made.

Example:
    >>> plan = Plan.load("plan.json")                     # doctest: +SKIP
    >>> print(plan.describe())                            # doctest: +SKIP
    >>> Plan.from_json(plan.to_json()) == plan            # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner._io import (
    atomic_write_text,
    lists_to_tuples,
    load_json,
    parse_json,
    printable,
    validate,
)
from planner.errors import PlanError
from planner.profile.format import Profile
from planner.schedules import PER_STAGE_SCHEDULES, OptimizerKind, Schedule
from planner.topology import Topology

__all__ = [
    "FORMAT",
    "BaselineScore",
    "Plan",
    "PlanStage",
    "Prediction",
    "ProfileRef",
    "ScheduleScore",
    "file_sha256",
    "find_profile_file",
    "load_plan_and_profile",
]

FORMAT = "planner.plan/1"
_GIB = 1024**3


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class ProfileRef:
    """The profile a plan was made from.

    Attributes:
        path: Where it was read from (as given; shipped profiles as ``profiles/<name>.json``).
        sha256: Hex sha256 of the file's bytes.
        model: The model spec the runtime rebuilds (``resnet50``, ``gpt2-small``, ``pkg.mod:fn``).
        batch_size: The profile's batch size as stored in the file.
        graph_hash: The profile's graph hash (None for imported PipeDream profiles).
        input_shape: Shape of one sample.
        dtype: The profile's dtype.
        leaf_modules: Modules kept whole while tracing (the runtime traces the same way).
    """

    path: str
    sha256: str
    model: str
    batch_size: int
    graph_hash: str | None = None
    input_shape: tuple[int, ...] = ()
    dtype: str = "float32"
    leaf_modules: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PlanStage:
    """One stage of a plan.

    Attributes:
        layers: Names of the stage's layers, in the profile's order.
        replicas: Devices running copies of this stage.
        ranks: Their ranks (``len(ranks) == replicas``).
        compute_s: Forward+backward of one microbatch on one replica, seconds.
        comm_s: Transfers into and out of the stage per microbatch, seconds.
        allreduce_s: Gradient all-reduce among the replicas, seconds.
        time_s: Effective steady-state time per microbatch (the objective's view), seconds.
        memory_bytes: Predicted peak memory of one replica, bytes.
    """

    layers: tuple[str, ...]
    replicas: int
    ranks: tuple[int, ...]
    compute_s: float
    comm_s: float
    allreduce_s: float
    time_s: float
    memory_bytes: float


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """What the plan is predicted to do.

    Attributes:
        bottleneck_s: Steady-state time of the slowest stage per microbatch, seconds.
        minibatch_s: Time of one minibatch (all its microbatches, flush included), seconds.
        samples_per_s: Minibatch size over ``minibatch_s``.
        single_device_s: One minibatch on one device (sum of all layers' compute), seconds.
        data_parallel_s: One minibatch under pure data parallelism on all devices, or None if
            it does not fit in memory.
        cost_model_minibatch_s: The optimizer's own formula for ``minibatch_s`` when
            ``minibatch_s`` is the simulator's (:func:`planner.simulate.simulate` of this plan,
            which charges what the formula cannot: unequal stages, transfers on the critical
            path); None when ``minibatch_s`` is the formula's (plans too large to simulate,
            plans written before the simulator predicted).
    """

    bottleneck_s: float
    minibatch_s: float
    samples_per_s: float
    single_device_s: float
    data_parallel_s: float | None
    cost_model_minibatch_s: float | None = None

    @property
    def speedup_over_single(self) -> float:
        return self.single_device_s / self.minibatch_s

    @property
    def speedup_over_data_parallel(self) -> float | None:
        return None if self.data_parallel_s is None else self.data_parallel_s / self.minibatch_s


@dataclass(frozen=True, kw_only=True)
class BaselineScore:
    """Another partitioner's plan, scored by the same cost model.

    Attributes:
        name: e.g. ``data-parallel``, ``gpipe-balanced``, ``uniform``, ``parameters``.
        minibatch_s: Its predicted minibatch time, seconds.
        stages: Its stage count.
        fits: Whether it fits in device memory.
        note: Why it does not fit, or other remarks.
    """

    name: str
    minibatch_s: float
    stages: int
    fits: bool = True
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class ScheduleScore:
    """The best plan found for one schedule shape, when the planner chose among schedules.

    Attributes:
        schedule: The schedule.
        chunks: Stages per rank (``interleaved-1f1b``, ``zbv``), else 1.
        microbatches: Microbatches per minibatch.
        ranks: Devices the pipeline uses.
        minibatch_s: Its minibatch time (simulated where the plan's is), seconds; 0 when none fits.
        fits: Whether it fits in device memory.
        note: Why it was not chosen or cannot run (e.g. torch's microbatch rule).
    """

    schedule: str
    chunks: int
    microbatches: int
    ranks: int
    minibatch_s: float
    fits: bool = True
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A pipeline-parallel execution plan; see the module docstring.

    Attributes:
        profile: The profile it was made from.
        topology: The devices it runs on.
        schedule: The pipeline schedule.
        optimizer: The training optimizer assumed for memory.
        minibatch_size: Samples per optimizer step.
        microbatch_size: Samples per microbatch.
        microbatches: Microbatches per minibatch.
        stages: Stages in pipeline order. Under ``interleaved-1f1b``, ``zb-h1`` and ``zbv`` these
            are the ``p x chunks`` virtual stages, one rank each, placed as
            :func:`planner.rank_schedules.stage_ranks` lays them out (a rank holds ``chunks``
            stages).
        chunks: Stages per rank (``interleaved-1f1b``: at least 2; ``zbv``: 2; otherwise 1).
        predicted: Predicted time and throughput.
        solver: ``dp``, ``ilp`` or ``baseline:<name>``.
        optimal: Whether the plan is proven optimal: over every partition when ``gap`` is set
            (the search was complete, or the plan meets the lower bound); plans written before
            ``gap`` existed: for the solver's own state space.
        gap: Relative distance above the lower bound over every partition
            (:func:`planner.optimize.bounds.certify`), 0.0 when proven optimal; None when not
            certified (older plans, baselines).
        note: A remark on how the plan was found (e.g. a state space larger than PipeDream's).
        cost_model: ``planner`` or ``pipedream``.
        recompute: Whether activations are recomputed in backward.
        weight_decay: Weight decay the run trains with (``plan run --weight-decay`` overrides).
        clip_grad_norm: Clip the whole model's gradient to this norm in the run; None: no clipping.
        baselines: Other partitioners' plans scored by the same cost model.
        schedules_compared: With ``--schedule auto``, the best plan of every schedule shape tried,
            fastest first (the chosen one first); empty otherwise.
        planner_version: The version that wrote the plan.
    """

    profile: ProfileRef
    topology: Topology
    schedule: Schedule
    optimizer: OptimizerKind
    minibatch_size: int
    microbatch_size: int
    microbatches: int
    stages: tuple[PlanStage, ...]
    predicted: Prediction
    chunks: int = 1
    solver: str = "dp"
    optimal: bool = True
    gap: float | None = None
    note: str = ""
    cost_model: str = "planner"
    recompute: bool = False
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    baselines: tuple[BaselineScore, ...] = ()
    schedules_compared: tuple[ScheduleScore, ...] = ()
    planner_version: str = ""

    def __post_init__(self) -> None:
        self._check_structure()

    # --- invariants ----------------------------------------------------------------------

    def _check_structure(self) -> None:
        if not self.stages:
            raise PlanError("a plan needs at least one stage")
        if self.microbatch_size * self.microbatches != self.minibatch_size:
            raise PlanError(
                f"minibatch {self.minibatch_size} is not {self.microbatches} microbatches of "
                f"{self.microbatch_size}; fix the sizes"
            )
        per_stage = self.schedule in PER_STAGE_SCHEDULES
        if per_stage and self.chunks != 1:
            raise PlanError(
                f"schedule {self.schedule} runs one stage per device, not {self.chunks} chunks; "
                "use chunks 1 or --schedule interleaved-1f1b"
            )
        if not per_stage:
            self._check_rank_layout()
        seen: dict[str, int] = {}
        ranks: dict[int, int] = {}
        devices = self.topology.num_devices
        for s, stage in enumerate(self.stages):
            if not stage.layers:
                raise PlanError(f"stage {s} has no layers")
            if stage.replicas < 1 or len(stage.ranks) != stage.replicas:
                raise PlanError(
                    f"stage {s} has {stage.replicas} replicas but {len(stage.ranks)} ranks "
                    f"{list(stage.ranks)}; give one rank per replica"
                )
            for layer in stage.layers:
                if layer in seen:
                    raise PlanError(f"layer {layer!r} is in stage {seen[layer]} and stage {s}")
                seen[layer] = s
            for rank in stage.ranks:
                if not 0 <= rank < devices:
                    raise PlanError(
                        f"stage {s} uses rank {rank}, outside the topology's {devices} devices"
                    )
                if per_stage and rank in ranks:
                    raise PlanError(f"rank {rank} runs both stage {ranks[rank]} and stage {s}")
                ranks.setdefault(rank, s)
        if len(ranks) > devices:
            raise PlanError(f"stages use {len(ranks)} devices but the topology has {devices}")

    def _check_rank_layout(self) -> None:
        """A rank schedule's stages: one rank each, ``chunks`` per rank, where torch puts them."""
        from planner.rank_schedules import check_schedule, stage_ranks

        num = len(self.stages)
        if self.chunks < 1 or num % self.chunks:
            raise PlanError(
                f"{num} stages are not {self.chunks} chunks on each of a whole number of ranks; "
                "re-plan"
            )
        ranks = num // self.chunks
        check_schedule(
            self.schedule, ranks=ranks, microbatches=self.microbatches, chunks=self.chunks
        )
        layout = stage_ranks(self.schedule, ranks=ranks, chunks=self.chunks)
        rank_of: dict[int, int] = {}
        for s, (stage, device) in enumerate(zip(self.stages, layout, strict=True)):
            if stage.replicas != 1 or len(stage.ranks) != 1:
                raise PlanError(
                    f"stage {s} has {len(stage.ranks)} ranks; schedule {self.schedule} runs one "
                    "rank per stage (no replication); re-plan"
                )
            if rank_of.setdefault(device, stage.ranks[0]) != stage.ranks[0]:
                raise PlanError(
                    f"stage {s} runs on rank {stage.ranks[0]}, but schedule {self.schedule} puts "
                    f"it with stage {layout.index(device)} on rank {rank_of[device]}; re-plan"
                )
        if len(set(rank_of.values())) != len(rank_of):
            raise PlanError(
                f"ranks {[st.ranks[0] for st in self.stages]} put two pipeline ranks on one "
                f"device; schedule {self.schedule} places stages as {list(layout)}"
            )

    @property
    def num_ranks(self) -> int:
        """Devices the plan runs on."""
        return len({r for stage in self.stages for r in stage.ranks})

    def check_profile(self, profile: Profile, sha256: str | None = None) -> None:
        """Check the plan against its profile: same file, every layer once, stages in DAG order.

        Raises:
            PlanError: The profile differs from the one the plan was made from, a layer is
                missing or unknown, or a layer reads from a later stage.
        """
        if sha256 is not None and sha256 != self.profile.sha256:
            raise PlanError(
                f"profile sha256 {sha256[:12]}… differs from the plan's {self.profile.sha256[:12]}… "
                f"({self.profile.path}); re-plan with this profile or pass the original one"
            )
        stage_of: dict[str, int] = {}
        for s, stage in enumerate(self.stages):
            for name in stage.layers:
                stage_of[name] = s
        names = [layer.name for layer in profile.layers]
        unknown = sorted(set(stage_of) - set(names))
        if unknown:
            raise PlanError(
                f"plan names layers the profile lacks ({', '.join(unknown[:3])}); "
                "the plan was made from another profile"
            )
        missing = [n for n in names if n not in stage_of]
        if missing:
            raise PlanError(
                f"{len(missing)} profile layers are in no stage (first: {missing[0]}); re-plan"
            )
        for layer in profile.layers:
            for source in layer.inputs:
                src = profile.layers[source].name
                if stage_of[src] > stage_of[layer.name]:
                    raise PlanError(
                        f"layer {layer.name} (stage {stage_of[layer.name]}) reads {src} from the "
                        f"later stage {stage_of[src]}; stages must follow the graph"
                    )

    def stage_layer_indices(self, profile: Profile) -> list[list[int]]:
        """The profile indices of each stage's layers."""
        return [[profile.index(name) for name in stage.layers] for stage in self.stages]

    # --- presentation --------------------------------------------------------------------

    @property
    def bottleneck_stage(self) -> int:
        return max(range(len(self.stages)), key=lambda s: self.stages[s].time_s)

    def certificate(self) -> str:
        """What is proven about the plan, as the summary prints it after the solver's name.

        Example:
            >>> from types import SimpleNamespace as NS
            >>> Plan.certificate(NS(optimal=False, gap=0.0123))
            ' (within 1.2% of the lower bound)'
            >>> Plan.certificate(NS(optimal=True, gap=0.0)), Plan.certificate(NS(optimal=True, gap=None))
            (' (proven optimal)', '')
        """
        if self.gap is None:
            return "" if self.optimal else " (not proven optimal)"
        if self.optimal:
            return " (proven optimal)"
        return f" (within {self.gap * 100:.1f}% of the lower bound)"

    def describe(self) -> str:
        """The human-readable stage table the CLI prints."""
        p = self.predicted
        ranks_of = [_ranks_text(stage.ranks) for stage in self.stages]
        header = (
            f"{printable(self.profile.model)}: {len(self.stages)} stages on {self.num_ranks}"
            f" of {self.topology.describe()}\n"
            f"schedule {self.schedule}{f' ({self.chunks} chunks per rank)' if self.chunks > 1 else ''}, minibatch {self.minibatch_size} = {self.microbatches} x "
            f"{self.microbatch_size}, optimizer {self.optimizer}, solver {self.solver}"
            f"{self.certificate()}, cost model {self.cost_model}"
            f"{', recompute' if self.recompute else ''}\n"
        )
        cols = (
            "stage",
            "layers",
            "n",
            "replicas",
            "ranks",
            "compute ms",
            "comm ms",
            "allreduce ms",
            "time ms",
            "memory GiB",
        )
        rows = []
        for s, stage in enumerate(self.stages):
            span = (
                stage.layers[0]
                if len(stage.layers) == 1
                else f"{stage.layers[0]} .. {stage.layers[-1]}"
            )
            mark = " *" if s == self.bottleneck_stage else ""
            rows.append(
                (
                    f"{s}{mark}",
                    _clip(printable(span), 44),
                    str(len(stage.layers)),
                    str(stage.replicas),
                    ranks_of[s],
                    f"{stage.compute_s * 1e3:.2f}",
                    f"{stage.comm_s * 1e3:.2f}",
                    f"{stage.allreduce_s * 1e3:.2f}",
                    f"{stage.time_s * 1e3:.2f}",
                    f"{stage.memory_bytes / _GIB:.2f}",
                )
            )
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        numeric = set(range(2, len(cols))) - {4}

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        table = "\n".join([line(cols), *(line(r) for r in rows)])
        lines = [
            header + (f"note: {printable(self.note, limit=300)}\n" if self.note else ""),
            table,
            "(* bottleneck stage; compute per microbatch on one replica; time = the stage's "
            "steady-state share per microbatch)",
            "",
            f"predicted: {p.bottleneck_s * 1e3:.2f} ms per microbatch at the bottleneck, "
            f"{p.minibatch_s * 1e3:.1f} ms per minibatch, {p.samples_per_s:.1f} samples/s"
            + (
                f" (simulated; the optimizer's formula: {p.cost_model_minibatch_s * 1e3:.1f} ms)"
                if p.cost_model_minibatch_s is not None
                # a rank schedule's plan is ranked and predicted by the simulator alone
                else " (simulated)"
                if self.schedule not in PER_STAGE_SCHEDULES
                else ""
            ),
        ]
        speed = f"speedup: {p.speedup_over_single:.2f}x over one device"
        dp = p.speedup_over_data_parallel
        speed += (
            f", {dp:.2f}x over data parallelism"
            if dp is not None
            else ", data parallelism does not fit in memory"
        )
        lines.append(speed)
        if self.schedules_compared:
            lines.append("schedules compared (best plan of each, fastest first):")
            for c in self.schedules_compared:
                shape = f"{c.schedule} x{c.chunks}" if c.chunks > 1 else c.schedule
                time = f"{c.minibatch_s * 1e3:10.1f} ms/minibatch" if c.minibatch_s > 0 else ""
                tail = f"  {printable(c.note, limit=200)}" if c.note else ""
                lines.append(
                    f"  {printable(shape, limit=40):<20} M={c.microbatches:<4} {c.ranks:>4} ranks"
                    f"  {time:>24}{'' if c.fits else '  does not fit'}{tail}"
                )
        if self.baselines:
            # a rank schedule's baselines are 1f1b partitions (the DP's baselines), simulated
            rank = self.schedule not in PER_STAGE_SCHEDULES
            label = "under 1f1b, simulated" if rank else "simulated, as this plan"
            lines.append(f"baselines ({label}):")
            for b in self.baselines:
                rate = self.minibatch_size / b.minibatch_s if b.minibatch_s > 0 else float("inf")
                note = printable(b.note, limit=200)
                fit = "" if b.fits else f"  does not fit: {note}" if note else "  does not fit"
                lines.append(
                    f"  {printable(b.name, limit=40):<16} {b.stages:>3} stages  {b.minibatch_s * 1e3:10.1f} ms/minibatch"
                    f"  {rate:9.1f} samples/s  (this plan: {b.minibatch_s / p.minibatch_s:.2f}x its throughput){fit}"
                )
        return "\n".join(lines)

    # --- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        doc = _plain(dataclasses.asdict(self))
        doc["topology"] = self.topology.to_dict()
        doc["schedule"] = str(self.schedule)
        doc["optimizer"] = str(self.optimizer)
        return {"format": FORMAT, **doc}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, doc: Any, what: str = "plan") -> Plan:
        if isinstance(doc, dict) and doc.get("format") != FORMAT:
            raise PlanError(
                f"{what} has format {doc.get('format')!r}, expected {FORMAT!r}; re-plan with `plan`"
            )
        validate(doc, "plan", PlanError, what)
        try:
            return cls(
                profile=ProfileRef(**lists_to_tuples(doc["profile"])),
                topology=Topology.from_dict(doc["topology"], f"{what} topology"),
                schedule=Schedule(doc["schedule"]),
                optimizer=OptimizerKind(doc["optimizer"]),
                stages=tuple(PlanStage(**lists_to_tuples(s)) for s in doc["stages"]),
                predicted=Prediction(**doc["predicted"]),
                baselines=tuple(BaselineScore(**b) for b in doc.get("baselines", ())),
                schedules_compared=tuple(
                    ScheduleScore(**b) for b in doc.get("schedules_compared", ())
                ),
                **{
                    k: doc[k]
                    for k in (
                        "minibatch_size",
                        "microbatch_size",
                        "microbatches",
                        "chunks",
                        "solver",
                        "optimal",
                        "gap",
                        "note",
                        "cost_model",
                        "recompute",
                        "weight_decay",
                        "clip_grad_norm",
                        "planner_version",
                    )
                    if k in doc
                },
            )
        except PlanError as exc:
            raise PlanError(f"{what}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, what: str = "plan") -> Plan:
        return cls.from_dict(parse_json(text, PlanError, what), what)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan atomically (temporary file, then rename)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read and validate a plan file; a bad file raises :class:`PlanError`."""
        return cls.from_dict(load_json(path, PlanError, "plan"), f"plan {os.fspath(path)}")


def _ranks_text(ranks: tuple[int, ...]) -> str:
    if len(ranks) > 1 and list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(str(r) for r in ranks)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def find_profile_file(
    plan: Plan, plan_path: str | os.PathLike[str], override: str | os.PathLike[str] | None = None
) -> Path:
    """The file of the plan's profile: ``override``; else its recorded path (as given, then
    relative to the plan's folder), else a file of that name beside the plan.

    Raises:
        PlanError: None of them exists.
    """
    if override is not None:
        return Path(override)  # Profile.load reports a missing file
    recorded = Path(plan.profile.path)
    folder = Path(plan_path).parent
    candidates = [recorded, folder / recorded, folder / recorded.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise PlanError(f"cannot find the plan's profile (tried {tried}); pass it with --profile FILE")


def load_plan_and_profile(
    plan_path: str | os.PathLike[str], override: str | os.PathLike[str] | None = None
) -> tuple[Plan, Profile]:
    """A plan and its profile, checked to belong together (same file, every layer once)."""
    plan = Plan.load(plan_path)
    path = find_profile_file(plan, plan_path, override)
    profile = Profile.load(path)
    plan.check_profile(profile, file_sha256(path))
    return plan, profile
