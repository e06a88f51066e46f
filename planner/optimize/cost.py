"""The cost model: what a stage costs in time and memory, and what every solver receives.

Every solver (the DP in :mod:`planner.optimize.dp`, the ILP, the baselines, the brute-force
oracle) is called as ``solve(cost: CostModel) -> Partition``: the :class:`CostModel` bundles the
profile (already at the microbatch size), the topology and the :class:`SolverOptions`, and holds
per-layer numpy arrays so that sums over any layer set are vectorised. Whatever a solver decides,
:meth:`CostModel.evaluate` scores it with the same formulas, so plans from different solvers are
comparable and a solver's optimum can be checked by enumeration.

Example:
    >>> from planner.profile import LayerProfile, Profile
    >>> from planner.topology import Topology
    >>> layers = tuple(
    ...     LayerProfile(name=f"l{i}", op="Linear", forward_ms=1.0, backward_ms=2.0,
    ...                  output_bytes=(1000,), parameter_bytes=4000, inputs=(i - 1,) if i else ())
    ...     for i in range(4))
    >>> cost = CostModel(Profile(model="mlp", batch_size=8, layers=layers),
    ...                  Topology.from_args(gpus=2, bandwidth_gbps=1e-3))
    >>> p = cost.evaluate([[0, 1], [2, 3]], [1, 1])
    >>> [round(s.time_s, 6) for s in p.stages], round(p.bottleneck_s, 6)
    ([0.006, 0.006], 0.006)

The formulas (``planner`` cost model), per stage ``s`` of ``S`` with ``m`` replicas; ``D_s`` is the
down-closed set of layers in stages ``0..s``:

* compute ``C`` = sum of forward + backward times of its layers (plus one more forward with
  recomputation). One replica processes one microbatch in ``C``.
* cut bytes ``X(D)`` = output bytes of every layer in ``D`` read by some layer outside ``D``. The
  runtime relays tensors that jump over a stage through the stages in between, so the link from
  stage ``s`` to ``s + 1`` carries exactly ``X(D_s)``, skip connections included.
* link time per microbatch ``L = 2 (latency + X / bandwidth)``: activations forward and their
  gradients backward, at the level the two stages' ranks share (:func:`boundary_link_level`).
* ring all-reduce of the stage's gradients among its replicas
  ``A = 2 (m - 1) / m * P / bandwidth + 2 (m - 1) latency`` at the slowest level the replicas span
  (Patarasuk & Yuan 2009: a ring sends 2 (m-1) chunks of P/m bytes, each a latency).
* steady-state time per microbatch, links overlapping compute (PipeDream SOSP'19 §3.1 takes the max
  of compute and communication): ``pipedream``: ``max((C + A) / m, L_in / m, L_out / m)`` (each
  replica all-reduces after each of its microbatches, PipeDream's weight-stashing data
  parallelism); ``1f1b``/``gpipe``: ``max(C, L_in, L_out) * ceil(M / m) / M`` with ``A`` paid once
  per minibatch at the flush. The replicas take the microbatches round-robin (microbatch ``i`` on
  replica ``i % m``), so the busiest one runs ``ceil(M / m)`` of the ``M`` per minibatch, and its
  links carry as many; ``M / m`` would be optimistic when ``m`` does not divide ``M``
  (:func:`replica_share`).
* objective: ``pipedream``: the slowest stage (throughput); ``1f1b``/``gpipe``: one minibatch of
  ``M`` microbatches, ``(M + S - 1) * slowest + max_s A_s`` (the fill/drain bubble is ``S - 1``
  slots; every stage all-reduces after the flush, concurrently, with no credit for overlap).
* memory per replica: weights ``P`` times the weight versions kept (``pipedream``: one per
  microbatch in flight, weight stashing; otherwise 1) + buffers + gradients ``P`` + optimizer
  state (sgd 0, momentum 1, adam 2 x ``P``) + saved activations times microbatches in flight
  (with recomputation: the stage's input ``X(D_{s-1})`` times microbatches in flight plus one
  microbatch's saved activations, rebuilt during its backward).
* microbatches in flight per replica: ``pipedream``: ``ceil(N_s / m)`` where ``N_s`` is the number
  of devices running stages ``s..S-1``: PipeDream's NOAM (SOSP'19 §3.3, ``ceil(devices / devices
  of the input stage)``) applied from stage ``s`` on; for a straight pipeline it is ``S - s``.
  ``1f1b``: the same, at most ``ceil(M / m)``. ``gpipe``: all ``ceil(M / m)``.

The ``pipedream`` cost model instead reproduces PipeDream's released optimizer
(``optimizer_graph_hierarchical.py``); its formulas are in :class:`PipeDreamFormulas` and used by
the DP directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from planner.errors import PlanError
from planner.optimize.formulas import (
    PipeDreamFormulas,
    allreduce_s,
    boundary_link_level,
    contiguous_ranks,
    in_flight,
    link_s,
    replica_share,
    schedule_objective,
)
from planner.optimize.result import Partition, StageAssignment
from planner.optimize.tables import DownsetTables
from planner.profile.format import Profile
from planner.schedules import OptimizerKind, Schedule
from planner.topology import Topology

__all__ = [
    "OPTIMIZER_STATE_FACTOR",
    "PIPEDREAM_DEFAULT_MEMORY_BYTES",
    "CostModel",
    "CostModelKind",
    "DownsetTables",
    "PipeDreamFormulas",
    "SolverOptions",
    "allreduce_s",
    "boundary_link_level",
    "contiguous_ranks",
    "in_flight",
    "link_s",
    "replica_share",
    "schedule_objective",
]

#: Optimizer state kept per parameter byte: SGD none, momentum one buffer, Adam two moments.
OPTIMIZER_STATE_FACTOR: dict[OptimizerKind, int] = {
    OptimizerKind.SGD: 0,
    OptimizerKind.MOMENTUM: 1,
    OptimizerKind.ADAM: 2,
}

#: ``optimizer_graph_hierarchical.py --memory_size`` default: 16e9 bytes (not 16 GiB).
PIPEDREAM_DEFAULT_MEMORY_BYTES = 16e9


class CostModelKind(StrEnum):
    """Which formulas score a plan.

    PLANNER: this project's model (module docstring): cut tensors, link levels, memory per schedule.
    PIPEDREAM: PipeDream's released optimizer, to reproduce its numbers on its profiles.
    """

    PLANNER = "planner"
    PIPEDREAM = "pipedream"


@dataclass(frozen=True, kw_only=True)
class SolverOptions:
    """Everything a solver needs besides the profile and the topology.

    Attributes:
        schedule: The pipeline schedule the objective and memory are computed for.
        microbatches: Microbatches per minibatch (``M``), already chosen.
        optimizer: The training optimizer (its state counts towards memory).
        straight: No replication: every stage on exactly one device.
        allow_fewer_devices: The plan may leave devices idle. PipeDream's optimizer uses all.
        memory_constraint: Refuse stages whose predicted memory exceeds a device's.
        recompute: Activation recomputation: keep stage inputs, rebuild internals in backward.
        cost_model: ``planner`` or ``pipedream`` formulas.
        activation_compression_ratio: PipeDream model only: if set, activation transfers count,
            divided by this ratio (PipeDream's ``--activation_compression_ratio``).
        memory_bytes: Device memory to plan for; None takes the topology's.
        state_space: Which downsets a stage boundary may be (see :mod:`planner.optimize.states`):
            ``auto`` (default), ``orders`` (prefixes of a few topological orders), ``profile``
            (prefixes of the profile's order only), ``antichain`` (PipeDream's antichain DAG),
            ``all`` (every downset, small graphs only).
    """

    schedule: Schedule = Schedule.PIPEDREAM
    microbatches: int = 1
    optimizer: OptimizerKind = OptimizerKind.SGD
    straight: bool = False
    allow_fewer_devices: bool = True
    memory_constraint: bool = True
    recompute: bool = False
    cost_model: CostModelKind = CostModelKind.PLANNER
    activation_compression_ratio: float | None = None
    memory_bytes: float | None = None
    state_space: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise PlanError(
                f"microbatches must be a positive whole number, got {self.microbatches!r}"
            )
        ratio = self.activation_compression_ratio
        if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
            raise PlanError(f"activation compression ratio must be positive, got {ratio!r}")
        if self.memory_bytes is not None and not self.memory_bytes > 0:
            raise PlanError(f"memory must be positive, got {self.memory_bytes!r} bytes")
        if self.state_space not in ("auto", "orders", "profile", "antichain", "all"):
            raise PlanError(
                f"unknown state space {self.state_space!r}; use auto, orders, profile, "
                "antichain or all"
            )


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _StageCosts:
    compute_s: float
    comm_s: float
    allreduce_s: float
    time_s: float
    sync_s: float
    memory_bytes: float


@dataclass(frozen=True)
class CostModel:
    """A profile, a topology and the options, with per-layer arrays precomputed.

    Attributes (arrays are per layer, in the profile's order):
        compute_s: Forward + backward seconds (+ one forward more with recomputation).
        forward_s: Forward seconds.
        parameter_bytes: Parameter bytes.
        buffer_bytes: Buffer bytes (kept once, not stashed).
        output_bytes: Bytes of all outputs (what a cut sends).
        saved_bytes: Bytes saved for backward (``saved_bytes``, else the output bytes).
        consumers: For each layer, the layers reading it.
        memory_limit_bytes: The device memory a stage's tensors may use: the device's, less
            what each process holds before its stage (``Topology.process_bytes``).
    """

    profile: Profile
    topology: Topology
    options: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self) -> None:
        layers = self.profile.layers
        fwd = np.array([la.forward_ms for la in layers], dtype=float) / 1e3
        bwd = np.array([la.backward_ms for la in layers], dtype=float) / 1e3
        compute = fwd + bwd + (fwd if self.options.recompute else 0.0)
        out = np.array([la.activation_bytes for la in layers], dtype=float)
        saved = np.array(
            [la.activation_bytes if la.saved_bytes is None else la.saved_bytes for la in layers],
            dtype=float,
        )
        arrays = {
            "forward_s": fwd,
            "compute_s": compute,
            "parameter_bytes": np.array([la.parameter_bytes for la in layers], dtype=float),
            "buffer_bytes": np.array([la.buffer_bytes for la in layers], dtype=float),
            "output_bytes": out,
            "saved_bytes": saved,
        }
        for name, value in arrays.items():
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "consumers", tuple(tuple(c) for c in self.profile.consumers()))
        object.__setattr__(self, "_edge_arrays", self._edges())
        memory = self.options.memory_bytes
        # what a stage's tensors may use: each process holds topology.process_bytes before them
        # (torch and gloo loaded; planner/topology.py), which plans add to every stage's memory
        object.__setattr__(
            self,
            "memory_limit_bytes",
            (self.topology.memory_bytes if memory is None else memory)
            - self.topology.process_bytes,
        )

    # attributes set in __post_init__ (declared for type checkers)
    forward_s: np.ndarray = field(init=False, repr=False, compare=False)
    compute_s: np.ndarray = field(init=False, repr=False, compare=False)
    parameter_bytes: np.ndarray = field(init=False, repr=False, compare=False)
    buffer_bytes: np.ndarray = field(init=False, repr=False, compare=False)
    output_bytes: np.ndarray = field(init=False, repr=False, compare=False)
    saved_bytes: np.ndarray = field(init=False, repr=False, compare=False)
    consumers: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _edge_arrays: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)
    memory_limit_bytes: float = field(init=False, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.profile.layers)

    @property
    def optimizer_factor(self) -> int:
        return OPTIMIZER_STATE_FACTOR[self.options.optimizer]

    # --- elementary queries ----------------------------------------------------------------

    def cut_bytes(self, downset: Sequence[int] | np.ndarray) -> float:
        """Bytes crossing the boundary of a down-closed layer set (index list or boolean mask).

        Each tensor is counted once however many later layers read it (it is relayed).

        Example:
            >>> from planner.profile import LayerProfile, Profile
            >>> from planner.topology import Topology
            >>> L = lambda n, i: LayerProfile(name=n, op="", forward_ms=1, backward_ms=1,
            ...                               output_bytes=(10,), parameter_bytes=0, inputs=i)
            >>> p = Profile(model="skip", batch_size=1,
            ...             layers=(L("a", ()), L("b", (0,)), L("c", (0, 1))))
            >>> CostModel(p, Topology.from_args(gpus=2)).cut_bytes([0])  # a -> b and a -> c
            10.0
        """
        mask = self._mask(downset)
        src, dst = self._edge_arrays
        crossing = np.unique(src[mask[src] & ~mask[dst]])
        return float(self.output_bytes[crossing].sum())

    def _edges(self) -> tuple[np.ndarray, np.ndarray]:
        """All edges as (source, destination) index arrays."""
        pairs = [(s, d) for d, la in enumerate(self.profile.layers) for s in la.inputs]
        if not pairs:
            return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
        arr = np.array(sorted(set(pairs)), dtype=int)
        return arr[:, 0], arr[:, 1]

    def _mask(self, layers: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(layers)
        if arr.dtype == bool:
            return arr
        mask = np.zeros(self.num_layers, dtype=bool)
        mask[arr.astype(int)] = True
        return mask

    def stage_memory_bytes(
        self,
        *,
        parameter_bytes: float,
        buffer_bytes: float,
        saved_bytes: float,
        input_bytes: float,
        replicas: int,
        devices_from_here: int,
    ) -> float:
        """Peak memory of one replica of a stage (module docstring), bytes.

        Example:
            >>> from planner.profile import LayerProfile, Profile
            >>> from planner.topology import Topology
            >>> la = LayerProfile(name="a", op="", forward_ms=1, backward_ms=1, output_bytes=(10,),
            ...                   parameter_bytes=100)
            >>> c = CostModel(Profile(model="m", batch_size=1, layers=(la,)),
            ...               Topology.from_args(gpus=2))
            >>> # 2 in flight: 2 weight versions + gradients + 2 x 30 saved bytes
            >>> c.stage_memory_bytes(parameter_bytes=100, buffer_bytes=0, saved_bytes=30,
            ...                      input_bytes=0, replicas=1, devices_from_here=2)
            360.0
        """
        o = self.options
        flight = in_flight(o.schedule, devices_from_here, replicas, o.microbatches)
        versions = flight if o.schedule is Schedule.PIPEDREAM else 1
        weights = parameter_bytes * (versions + 1 + self.optimizer_factor) + buffer_bytes
        # with recomputation only the stage inputs wait; one microbatch's internals are rebuilt
        activations = input_bytes * flight + saved_bytes if o.recompute else saved_bytes * flight
        return float(weights + activations)

    def allreduce_level_s(self, nbytes: float, replicas: int, level: int) -> float:
        """All-reduce seconds at a topology level (-1: a single device, 0 s)."""
        if level < 0:
            return 0.0
        lv = self.topology.levels[level]
        return allreduce_s(nbytes, replicas, lv.ring_bandwidth_bytes_per_s, lv.ring_latency_s)

    def link_level_s(self, nbytes: float, level: int) -> float:
        """Link seconds per microbatch at a topology level (-1: same device, 0 s)."""
        if level < 0:
            return 0.0
        lv = self.topology.levels[level]
        return link_s(nbytes, lv.bandwidth_bytes_per_s, lv.latency_s)

    def stage_time_s(
        self,
        *,
        compute_s: float,
        allreduce_s: float,
        link_in_s: float,
        link_out_s: float,
        replicas: int,
    ) -> float:
        """Steady-state seconds per microbatch of a stage (module docstring)."""
        o = self.options
        work = compute_s + (allreduce_s if o.schedule is Schedule.PIPEDREAM else 0.0)
        return max(work, link_in_s, link_out_s) * replica_share(
            o.schedule, replicas, o.microbatches
        )

    # --- scoring a whole partition ----------------------------------------------------------

    def evaluate(
        self,
        stages: Sequence[Sequence[int]],
        replicas: Sequence[int],
        ranks: Sequence[Sequence[int]] | None = None,
        *,
        solver: str = "evaluate",
        optimal: bool = False,
    ) -> Partition:
        """Score a partition with the ``planner`` formulas (any solver's answer, or a baseline).

        Args:
            stages: Layer indices of each stage, stages in pipeline order.
            replicas: Devices per stage.
            ranks: Ranks per stage; default :func:`contiguous_ranks`.
            solver: Recorded in the result.
            optimal: Recorded in the result.

        Raises:
            PlanError: Layers missing or repeated, stages not in a topological order, ranks
                repeated or more devices than the topology has.

        Example:
            >>> from planner.profile import LayerProfile, Profile
            >>> from planner.topology import Topology
            >>> la = lambda i: LayerProfile(name=f"l{i}", op="", forward_ms=10, backward_ms=20,
            ...     output_bytes=(0,), parameter_bytes=0, inputs=(i - 1,) if i else ())
            >>> c = CostModel(Profile(model="m", batch_size=1, layers=(la(0), la(1))),
            ...               Topology.from_args(gpus=3))
            >>> c.evaluate([[0], [1]], [2, 1]).bottleneck_s
            0.03
        """
        stage_lists = [sorted(int(i) for i in s) for s in stages]
        reps = [int(m) for m in replicas]
        self._check(stage_lists, reps)
        rank_sets = contiguous_ranks(reps) if ranks is None else tuple(tuple(r) for r in ranks)
        used = [r for rs in rank_sets for r in rs]
        if len(set(used)) != len(used) or any(not 0 <= r < self.topology.num_devices for r in used):
            raise PlanError(
                f"ranks {rank_sets} repeat a rank or fall outside 0..{self.topology.num_devices - 1}"
            )
        if any(len(rs) != m for rs, m in zip(rank_sets, reps, strict=True)):
            raise PlanError(f"ranks {rank_sets} do not match the replicas {reps}")
        if self.options.cost_model is CostModelKind.PIPEDREAM:
            costs = self._pipedream_stage_costs(stage_lists, reps, rank_sets)
        else:
            costs = self._planner_stage_costs(stage_lists, reps, rank_sets)
        bottleneck, minibatch, objective = schedule_objective(
            self.options.schedule,
            self.options.microbatches,
            [c.time_s for c in costs],
            [c.sync_s for c in costs],
        )
        return Partition(
            stages=tuple(
                StageAssignment(
                    layers=tuple(s),
                    replicas=m,
                    ranks=rs,
                    compute_s=c.compute_s,
                    comm_s=c.comm_s,
                    allreduce_s=c.allreduce_s,
                    time_s=c.time_s,
                    memory_bytes=c.memory_bytes,
                )
                for s, m, rs, c in zip(stage_lists, reps, rank_sets, costs, strict=True)
            ),
            schedule=self.options.schedule,
            microbatches=self.options.microbatches,
            bottleneck_s=bottleneck,
            minibatch_s=minibatch,
            objective_s=objective,
            solver=solver,
            optimal=optimal,
            cost_model=str(self.options.cost_model),
        )

    def fits(self, partition: Partition) -> bool:
        """Whether every stage of ``partition`` fits in device memory (always True when the
        memory constraint is off)."""
        if not self.options.memory_constraint:
            return True
        return all(s.memory_bytes <= self.memory_limit_bytes for s in partition.stages)

    def _check(self, stages: list[list[int]], replicas: list[int]) -> None:
        n = self.num_layers
        seen = sorted(i for s in stages for i in s)
        if seen != list(range(n)):
            raise PlanError(
                f"stages must hold every layer 0..{n - 1} exactly once; got {len(seen)} entries "
                f"for {n} layers"
            )
        if (
            len(stages) != len(replicas)
            or any(m < 1 for m in replicas)
            or any(not s for s in stages)
        ):
            raise PlanError(f"every stage needs layers and at least one replica; got {replicas}")
        if self.options.straight and any(m != 1 for m in replicas):
            raise PlanError(f"a straight pipeline has one replica per stage; got {replicas}")
        if sum(replicas) > self.topology.num_devices:
            raise PlanError(
                f"{sum(replicas)} devices used but the topology has {self.topology.num_devices}"
            )
        stage_of = np.empty(n, dtype=int)
        for s, layers in enumerate(stages):
            stage_of[layers] = s
        for i, layer in enumerate(self.profile.layers):
            for src in layer.inputs:
                if stage_of[src] > stage_of[i]:
                    raise PlanError(
                        f"layer {i} ({layer.name}) in stage {stage_of[i]} reads layer {src} of the "
                        f"later stage {stage_of[src]}; stages must follow a topological order"
                    )

    def _planner_stage_costs(
        self, stages: list[list[int]], replicas: list[int], ranks: tuple[tuple[int, ...], ...]
    ) -> list[_StageCosts]:
        topo = self.topology
        mask = np.zeros(self.num_layers, dtype=bool)
        cuts = []
        for layers in stages[:-1]:
            mask[layers] = True
            cuts.append(self.cut_bytes(mask))
        out = []
        for s, (layers, m) in enumerate(zip(stages, replicas, strict=True)):
            compute = float(self.compute_s[layers].sum())
            params = float(self.parameter_bytes[layers].sum())
            ar = self.allreduce_level_s(params, m, topo.span_level(ranks[s]))
            x_in = cuts[s - 1] if s > 0 else 0.0
            x_out = cuts[s] if s < len(stages) - 1 else 0.0
            l_in = (
                self.link_level_s(x_in, boundary_link_level(topo, ranks[s - 1], ranks[s]))
                if s > 0
                else 0.0
            )
            l_out = (
                self.link_level_s(x_out, boundary_link_level(topo, ranks[s], ranks[s + 1]))
                if s < len(stages) - 1
                else 0.0
            )
            time = self.stage_time_s(
                compute_s=compute, allreduce_s=ar, link_in_s=l_in, link_out_s=l_out, replicas=m
            )
            memory = self.stage_memory_bytes(
                parameter_bytes=params,
                buffer_bytes=float(self.buffer_bytes[layers].sum()),
                saved_bytes=float(self.saved_bytes[layers].sum()),
                input_bytes=x_in,
                replicas=m,
                devices_from_here=sum(replicas[s:]),
            )
            sync = ar if self.options.schedule is not Schedule.PIPEDREAM else 0.0
            out.append(
                _StageCosts(
                    compute_s=compute,
                    comm_s=(l_in + l_out)
                    * replica_share(self.options.schedule, m, self.options.microbatches),
                    allreduce_s=ar,
                    time_s=time,
                    sync_s=sync,
                    memory_bytes=memory,
                )
            )
        return out

    def _pipedream_stage_costs(
        self, stages: list[list[int]], replicas: list[int], ranks: tuple[tuple[int, ...], ...]
    ) -> list[_StageCosts]:
        # Flat reading of PipeDream's formulas (PipeDreamFormulas): the bandwidth of the slowest
        # level a stage's replicas span; memory against the devices used up to the stage.
        topo = self.topology
        total = sum(replicas)
        out, used = [], 0
        ratio = self.options.activation_compression_ratio
        mask = np.zeros(self.num_layers, dtype=bool)
        for s, (layers, m) in enumerate(zip(stages, replicas, strict=True)):
            used += m
            compute = float(self.compute_s[layers].sum())
            params = float(self.parameter_bytes[layers].sum())
            level = max(topo.span_level(ranks[s]), 0)
            bw = topo.levels[level].bandwidth_bytes_per_s
            dp = 4.0 * (m - 1) * params / (bw * m)
            time = (compute + dp) / m
            comm = 0.0
            if ratio is not None:
                x_in = self.cut_bytes(mask) if s > 0 else 0.0
                mask[layers] = True
                x_out = self.cut_bytes(mask) if s < len(stages) - 1 else 0.0
                comm = max(x_in, x_out) * 2.0 / (bw * m * ratio)
                time = max(time, comm)
            memory = (float(self.output_bytes[layers].sum()) + params) * -(-(total - used) // m)
            out.append(
                _StageCosts(
                    compute_s=compute,
                    comm_s=comm,
                    allreduce_s=dp,
                    time_s=time,
                    sync_s=0.0,
                    memory_bytes=memory,
                )
            )
        return out
