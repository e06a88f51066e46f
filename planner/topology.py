"""The interconnect: levels of (devices, bandwidth, latency) from the innermost out, and memory.

``--gpus 8`` is one level of 8 devices; ``--gpus 16 --gpus-per-node 8`` is two levels: 8 devices
per server, 2 servers. Rank ``r`` sits at position ``r % 8`` in server ``r // 8``; two ranks talk
over the innermost level that contains both.

A plan made from a CPU profile describes CPU processes on one machine talking over gloo on
loopback; unless the user gives links, ``plan`` uses the ``cpu-loopback`` links measured here
(:data:`CPU_LOOPBACK`, :func:`with_loopback_links`): their per-message latency, not bandwidth, is
what small models pay, and each process's fixed memory (torch and gloo loaded, before any model)
counts in every stage's memory (``Topology.process_bytes``).

Example:
    >>> t = Topology.from_args(gpus=16, gpus_per_node=8, bandwidth_gbps=25, inter_node_bandwidth_gbps=10)
    >>> t.num_devices, t.link_level(0, 7), t.link_level(0, 8)
    (16, 0, 1)
    >>> t.span_level([8, 9, 10])
    0
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner._io import atomic_write_text, load_json, printable
from planner.errors import TopologyError

__all__ = [
    "CPU_LOOPBACK",
    "CPU_LOOPBACK_NAME",
    "DEFAULT_BANDWIDTH_GBPS",
    "DEFAULT_INTER_NODE_BANDWIDTH_GBPS",
    "DEFAULT_MEMORY_GB",
    "MAX_FILE_DEVICES",
    "PRESETS",
    "Level",
    "LoopbackLinks",
    "Topology",
    "parse_bandwidth",
    "with_loopback_links",
]

GB = 1e9
GIB = 1024**3
DEFAULT_BANDWIDTH_GBPS = 25.0
DEFAULT_INTER_NODE_BANDWIDTH_GBPS = 10.0
DEFAULT_MEMORY_GB = 16.0
MAX_FILE_DEVICES = 2**20
"""The most devices a topology file may describe (a guard against absurd counts, not a promise
that the solvers are fast at this size)."""


@dataclass(frozen=True, kw_only=True)
class Level:
    """One tier of the interconnect.

    Attributes:
        devices: How many units of the level below (or devices, for level 0) one unit holds.
        bandwidth_bytes_per_s: Point-to-point bandwidth of a link at this level, bytes/s.
        latency_s: Per-message latency of a link at this level, seconds.
        allreduce_bandwidth_bytes_per_s: Bandwidth one step of a ring all-reduce achieves at this
            level, bytes/s; None means the links' (an NCCL ring runs at link speed). Set where the
            collective is measurably slower than point-to-point: gloo on CPU sums on the CPU,
            between compute (:data:`CPU_LOOPBACK`).
        allreduce_latency_s: Fixed cost of one step of a ring all-reduce, seconds; None means
            the links' latency.
    """

    devices: int
    bandwidth_bytes_per_s: float
    latency_s: float = 0.0
    allreduce_bandwidth_bytes_per_s: float | None = None
    allreduce_latency_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.devices, int) or self.devices < 1:
            raise TopologyError(f"a level needs at least 1 device, got {self.devices!r}")
        if not math.isfinite(self.bandwidth_bytes_per_s) or self.bandwidth_bytes_per_s <= 0:
            raise TopologyError(
                f"bandwidth must be positive, got {self.bandwidth_bytes_per_s!r} bytes/s"
            )
        if not math.isfinite(self.latency_s) or self.latency_s < 0:
            raise TopologyError(f"latency must be zero or positive, got {self.latency_s!r} s")
        bw, lat = self.allreduce_bandwidth_bytes_per_s, self.allreduce_latency_s
        if bw is not None and (not math.isfinite(bw) or bw <= 0):
            raise TopologyError(f"all-reduce bandwidth must be positive, got {bw!r} bytes/s")
        if lat is not None and (not math.isfinite(lat) or lat < 0):
            raise TopologyError(f"all-reduce latency must be zero or positive, got {lat!r} s")

    @property
    def ring_bandwidth_bytes_per_s(self) -> float:
        """Bandwidth of one ring all-reduce step (the links' unless measured apart)."""
        bw = self.allreduce_bandwidth_bytes_per_s
        return self.bandwidth_bytes_per_s if bw is None else bw

    @property
    def ring_latency_s(self) -> float:
        """Fixed cost of one ring all-reduce step (the links' latency unless measured apart)."""
        lat = self.allreduce_latency_s
        return self.latency_s if lat is None else lat

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "devices": self.devices,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "latency_s": self.latency_s,
        }
        # written only when set, so files of topologies without them stay as they were
        if self.allreduce_bandwidth_bytes_per_s is not None:
            doc["allreduce_bandwidth_bytes_per_s"] = self.allreduce_bandwidth_bytes_per_s
        if self.allreduce_latency_s is not None:
            doc["allreduce_latency_s"] = self.allreduce_latency_s
        return doc


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Devices arranged in levels, innermost first, each device with ``memory_bytes`` of memory.

    Attributes:
        levels: The tiers, innermost (e.g. inside a server) first.
        memory_bytes: Memory of one device, bytes.
        name: A preset's name, or "" for a topology built from arguments.
        process_bytes: Memory each rank's process holds before it builds its stage (the
            framework's libraries and runtime), counted in every stage's memory; part of
            ``memory_bytes``. Measured for CPU processes (:data:`CPU_LOOPBACK`); 0 elsewhere:
            on a GPU the CUDA context also takes device memory, but nobody measured it here.
        op_overhead_s: Seconds each forward or backward operation costs its rank beyond its
            layers' compute: the runtime's own work per operation (posting its sends and
            receives, bookkeeping, its share of the data and the optimizer step). The simulator
            charges it on the rank for every operation. Measured for CPU processes over gloo
            (:data:`CPU_LOOPBACK`, ``benchmarks/runtime_overhead.py``); 0 elsewhere (not
            measured on GPUs, where kernels run asynchronously to it).
        update_s_per_byte: Seconds one optimizer step takes per byte of the parameters it
            updates, per optimizer kind (``(("sgd", 1.4e-10), ...)``); the simulator charges a
            stage's step after its minibatch (after the all-reduce). Measured in training runs on
            this project's CPUs (:data:`CPU_LOOPBACK`); empty elsewhere (on a GPU the step is a
            few fused kernels).
    """

    levels: tuple[Level, ...]
    memory_bytes: float
    name: str = ""
    process_bytes: float = 0.0
    op_overhead_s: float = 0.0
    update_s_per_byte: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.levels:
            raise TopologyError("a topology needs at least one level")
        if not math.isfinite(self.memory_bytes) or self.memory_bytes <= 0:
            raise TopologyError(f"device memory must be positive, got {self.memory_bytes!r} bytes")
        if not math.isfinite(self.process_bytes) or self.process_bytes < 0:
            raise TopologyError(
                f"per-process memory must be zero or positive, got {self.process_bytes!r} bytes"
            )
        if not math.isfinite(self.op_overhead_s) or self.op_overhead_s < 0:
            raise TopologyError(
                f"the overhead per operation must be zero or positive, got {self.op_overhead_s!r} s"
            )
        for kind, value in self.update_s_per_byte:
            if not math.isfinite(value) or value < 0:
                raise TopologyError(
                    f"the {kind} step's seconds per byte must be zero or positive, got {value!r}"
                )
        if self.process_bytes >= self.memory_bytes:
            raise TopologyError(
                f"a device's memory ({self.memory_bytes / GIB:.3g} GiB) must exceed what each "
                f"process holds before its stage ({self.process_bytes / GIB:.3g} GiB); "
                "give more --memory-gb"
            )

    @property
    def num_devices(self) -> int:
        return math.prod(level.devices for level in self.levels)

    def block_size(self, level: int) -> int:
        """Devices in one unit of ``level`` (e.g. devices per server for level 0)."""
        return math.prod(lv.devices for lv in self.levels[: level + 1])

    def link_level(self, rank_a: int, rank_b: int) -> int:
        """The innermost level whose unit contains both ranks (-1 when they are the same)."""
        if rank_a == rank_b:
            return -1
        for level in range(len(self.levels)):
            size = self.block_size(level)
            if rank_a // size == rank_b // size:
                return level
        raise TopologyError(
            f"ranks {rank_a} and {rank_b} are not both within {self.num_devices} devices"
        )

    def span_level(self, ranks: Iterable[int]) -> int:
        """The slowest (outermost) level that a group of ranks spans; -1 for a single rank."""
        ranks = sorted(set(ranks))
        return max((self.link_level(ranks[0], r) for r in ranks[1:]), default=-1)

    def bandwidth(self, level: int) -> float:
        """Bytes/s of a link at ``level``."""
        return self.levels[level].bandwidth_bytes_per_s

    def transfer_s(self, nbytes: float, level: int) -> float:
        """Seconds to send ``nbytes`` over one link at ``level`` (0 on the same device)."""
        if level < 0 or nbytes <= 0:
            return 0.0
        lv = self.levels[level]
        return lv.latency_s + nbytes / lv.bandwidth_bytes_per_s

    def describe(self) -> str:
        """One line, e.g. ``2 x 8 devices (links 25 GB/s, 10 GB/s, innermost first), 16 GiB
        each``; a link's latency follows its bandwidth (``3.6 GB/s + 28 us``).

        Example:
            >>> with_loopback_links(Topology.from_args(gpus=2)).describe()  # doctest: +ELLIPSIS
            'cpu-loopback: 2 devices (links ... GB/s + ... us, innermost first), 16 GiB each, ... GiB of it per process, ... us of runtime per operation'
        """
        counts = " x ".join(str(lv.devices) for lv in reversed(self.levels))
        bws = ", ".join(
            f"{lv.bandwidth_bytes_per_s / GB:g} GB/s"
            + (f" + {lv.latency_s * 1e6:.3g} us" if lv.latency_s > 0 else "")
            for lv in self.levels
        )
        label = f"{self.name}: " if self.name else ""
        process = (
            f", {self.process_bytes / GIB:.2g} GiB of it per process" if self.process_bytes else ""
        )
        overhead = (
            f", {self.op_overhead_s * 1e6:.3g} us of runtime per operation"
            if self.op_overhead_s
            else ""
        )
        return (
            f"{label}{counts} devices (links {bws}, innermost first), "
            f"{self.memory_bytes / GIB:g} GiB each{process}{overhead}"
        )

    # --- construction --------------------------------------------------------------------

    @classmethod
    def from_args(
        cls,
        *,
        gpus: int,
        gpus_per_node: int | None = None,
        bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS,
        inter_node_bandwidth_gbps: float = DEFAULT_INTER_NODE_BANDWIDTH_GBPS,
        memory_gb: float = DEFAULT_MEMORY_GB,
        latency_s: float = 0.0,
        inter_node_latency_s: float = 0.0,
    ) -> Topology:
        """The topology ``--gpus N [--gpus-per-node K]`` describes (bandwidths in GB/s, 1e9 B/s)."""
        if not isinstance(gpus, int) or gpus < 1:
            raise TopologyError(f"--gpus must be a positive whole number, got {gpus!r}")
        levels: tuple[Level, ...]
        if gpus_per_node is None or gpus_per_node == gpus:
            levels = (
                Level(devices=gpus, bandwidth_bytes_per_s=bandwidth_gbps * GB, latency_s=latency_s),
            )
        else:
            if gpus_per_node < 1 or gpus % gpus_per_node:
                raise TopologyError(
                    f"--gpus-per-node {gpus_per_node} does not divide --gpus {gpus}; "
                    "use a divisor such as "
                    + ", ".join(str(d) for d in range(1, gpus + 1) if gpus % d == 0 and d > 1)
                )
            levels = (
                Level(
                    devices=gpus_per_node,
                    bandwidth_bytes_per_s=bandwidth_gbps * GB,
                    latency_s=latency_s,
                ),
                Level(
                    devices=gpus // gpus_per_node,
                    bandwidth_bytes_per_s=inter_node_bandwidth_gbps * GB,
                    latency_s=inter_node_latency_s,
                ),
            )
        return cls(levels=levels, memory_bytes=memory_gb * GIB)

    @classmethod
    def preset(cls, name: str, nodes: int = 1) -> Topology:
        """A named machine (see :data:`PRESETS`), ``nodes`` of them on its network."""
        try:
            spec = PRESETS[name]
        except KeyError:
            raise TopologyError(
                f"unknown topology preset {name!r}; choose one of {', '.join(sorted(PRESETS))} "
                "or give a JSON file"
            ) from None
        levels = [
            Level(
                devices=spec["gpus_per_node"],
                bandwidth_bytes_per_s=spec["intra_gbps"] * GB,
                latency_s=spec["intra_latency_s"],
            )
        ]
        if nodes > 1:
            levels.append(
                Level(
                    devices=nodes,
                    bandwidth_bytes_per_s=spec["inter_gbps"] * GB,
                    latency_s=spec["inter_latency_s"],
                )
            )
        return cls(levels=tuple(levels), memory_bytes=spec["memory_gb"] * GIB, name=name)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": "planner.topology/1",
            "name": self.name,
            "memory_bytes": self.memory_bytes,
            "levels": [lv.to_dict() for lv in self.levels],
        }
        if self.process_bytes:  # written only when set, so older readers' files stay the same
            doc["process_bytes"] = self.process_bytes
        if self.op_overhead_s:
            doc["op_overhead_s"] = self.op_overhead_s
        if self.update_s_per_byte:
            doc["update_s_per_byte"] = dict(self.update_s_per_byte)
        return doc

    def update_s(self, optimizer: str, parameter_bytes: float) -> float:
        """Seconds of one ``optimizer`` step over ``parameter_bytes`` (0 where not measured).

        Example:
            >>> t = Topology.from_args(gpus=1)
            >>> measured = Topology(levels=t.levels, memory_bytes=2**30, update_s_per_byte=(("adam", 1e-9),))
            >>> t.update_s("adam", 1e6), measured.update_s("adam", 1e6), measured.update_s("sgd", 1e6)
            (0.0, 0.001, 0.0)
        """
        return dict(self.update_s_per_byte).get(str(optimizer), 0.0) * parameter_bytes

    @classmethod
    def from_dict(cls, doc: Any, what: str = "topology") -> Topology:
        if not isinstance(doc, dict) or not isinstance(doc.get("levels"), list):
            raise TopologyError(f"{what} must be an object with a list 'levels'; see `plan --help`")
        for index, lv in enumerate(doc["levels"]):
            devices = lv.get("devices") if isinstance(lv, dict) else None
            if isinstance(devices, bool) or not isinstance(devices, int):
                raise TopologyError(
                    f"{what}: levels/{index}/devices must be a whole number of devices, got "
                    f"{printable(repr(devices), limit=40)}; fix the file"
                )
        total = math.prod(lv["devices"] for lv in doc["levels"])
        if total > MAX_FILE_DEVICES:
            raise TopologyError(
                f"{what} has {total} devices, more than the {MAX_FILE_DEVICES} a topology file "
                "may describe; check the 'devices' of each level"
            )
        try:
            levels = tuple(
                Level(
                    devices=lv["devices"],
                    bandwidth_bytes_per_s=float(lv["bandwidth_bytes_per_s"]),
                    latency_s=float(lv.get("latency_s", 0.0)),
                    allreduce_bandwidth_bytes_per_s=_optional_float(
                        lv.get("allreduce_bandwidth_bytes_per_s")
                    ),
                    allreduce_latency_s=_optional_float(lv.get("allreduce_latency_s")),
                )
                for lv in doc["levels"]
            )
            memory = float(doc["memory_bytes"])
            if not math.isfinite(memory) or memory <= 0:
                raise TopologyError(f"memory_bytes must be positive, got {doc['memory_bytes']!r}")
            return cls(
                levels=levels,
                memory_bytes=memory,
                name=printable(doc.get("name", ""), limit=60),
                process_bytes=float(doc.get("process_bytes", 0.0)),
                op_overhead_s=float(doc.get("op_overhead_s", 0.0)),
                update_s_per_byte=tuple(
                    (str(kind), float(value))
                    for kind, value in dict(doc.get("update_s_per_byte", {})).items()
                ),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise TopologyError(
                f"{what}: each level needs 'devices' and 'bandwidth_bytes_per_s', and the topology "
                f"'memory_bytes' ({type(exc).__name__}: {exc})"
            ) from None
        except TopologyError as exc:
            raise TopologyError(f"{what}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Topology:
        return cls.from_dict(
            load_json(path, TopologyError, "topology file"), f"topology {Path(path)}"
        )

    @classmethod
    def resolve(cls, spec: str, nodes: int = 1) -> Topology:
        """``spec`` is a preset name or a JSON file path."""
        if spec in PRESETS:
            return cls.preset(spec, nodes)
        if spec.endswith(".json") or os.path.exists(spec):
            return cls.load(spec)
        return cls.preset(spec, nodes)  # raises with the list of presets


# Where the numbers come from: vendor datasheets, and for the PipeDream clusters the SOSP'19 paper
# (Table 1: Cluster-A is Azure NC24 v3, 4 V100 over PCIe, 10 Gbps Ethernet; Cluster-B is AWS
# p3.16xlarge, 8 V100 over NVLink, 25 Gbps). Bandwidths are per link and direction.
PRESETS: dict[str, dict[str, Any]] = {
    "p3.16xlarge": {  # AWS: 8x V100-SXM2 16 GB, NVLink 2 at 25 GB/s a link; 25 Gbit/s network
        "gpus_per_node": 8,
        "memory_gb": 16,
        "intra_gbps": 25.0,
        "inter_gbps": 25 / 8,
        "intra_latency_s": 5e-6,
        "inter_latency_s": 20e-6,
    },
    "nc24v3": {  # Azure: 4x V100-PCIe 16 GB, PCIe 3.0 x16 (15.75 GB/s theoretical); 10 Gbit/s
        "gpus_per_node": 4,
        "memory_gb": 16,
        "intra_gbps": 15.75,
        "inter_gbps": 10 / 8,
        "intra_latency_s": 5e-6,
        "inter_latency_s": 20e-6,
    },
    "dgx-a100": {  # NVIDIA DGX A100: 8x A100 80 GB, NVSwitch 300 GB/s a GPU and direction;
        # one 200 Gbit/s HDR InfiniBand adapter per GPU (25 GB/s)
        "gpus_per_node": 8,
        "memory_gb": 80,
        "intra_gbps": 300.0,
        "inter_gbps": 25.0,
        "intra_latency_s": 3e-6,
        "inter_latency_s": 5e-6,
    },
    "dgx-h100": {  # NVIDIA DGX H100: 8x H100 80 GB, NVLink 4 450 GB/s a GPU and direction;
        # one 400 Gbit/s NDR InfiniBand adapter per GPU (50 GB/s)
        "gpus_per_node": 8,
        "memory_gb": 80,
        "intra_gbps": 450.0,
        "inter_gbps": 50.0,
        "intra_latency_s": 3e-6,
        "inter_latency_s": 5e-6,
    },
}


@dataclass(frozen=True, kw_only=True)
class LoopbackLinks:
    """Measured links between CPU processes on one machine, and a process's fixed memory.

    Attributes:
        latency_s: Per-message latency of a point-to-point transfer, seconds.
        bandwidth_bytes_per_s: Point-to-point bandwidth, bytes/s.
        process_bytes: Resident memory of a rank before it builds a model: torch imported, the
            gloo group joined, one tiny training step taken (kernels and autograd loaded).
        source: How and when the numbers were measured.
        allreduce_latency_s: Fixed cost of one step of gloo's ring all-reduce after compute
            (:attr:`Level.allreduce_latency_s`), seconds.
        allreduce_bandwidth_bytes_per_s: Bandwidth of one step of that all-reduce, bytes/s.
        allreduce_source: How and when the all-reduce was measured.
        op_overhead_s: The runtime's own seconds per forward or backward on a rank
            (:attr:`Topology.op_overhead_s`); 0 leaves it out.
        op_overhead_source: How and when ``op_overhead_s`` was measured.
        update_s_per_byte: The optimizer step's seconds per parameter byte, per optimizer kind
            (:attr:`Topology.update_s_per_byte`), measured as ``op_overhead_s`` is.
    """

    latency_s: float
    bandwidth_bytes_per_s: float
    process_bytes: float
    source: str
    allreduce_latency_s: float | None = None
    allreduce_bandwidth_bytes_per_s: float | None = None
    allreduce_source: str = ""
    op_overhead_s: float = 0.0
    op_overhead_source: str = ""
    update_s_per_byte: tuple[tuple[str, float], ...] = ()


CPU_LOOPBACK_NAME = "cpu-loopback"
CPU_LOOPBACK = LoopbackLinks(
    latency_s=36.9e-6,
    bandwidth_bytes_per_s=4.59e9,
    process_bytes=674 * 2**20,
    source=(
        "python benchmarks/loopback_links.py --iters 50 --max-mib 64, 2026-11-25 16:34 UTC, "
        "this project's 2-core AMD EPYC VM, torch 2.14.1, gloo on 127.0.0.1, 2 ranks of 1 thread, "
        "fastest of 50 round trips per size (load 3.5: busy; the median was ~2 ms a message), "
        "resident set after a tiny training step; benchmarks/RESULTS.md"
    ),
    allreduce_latency_s=130.3e-6,
    allreduce_bandwidth_bytes_per_s=1.148e9,
    allreduce_source=(
        "python benchmarks/loopback_links.py --iters 50 --max-mib 64, 2026-12-06 19:39 UTC, "
        "load 0.9 (quiet): the median all_reduce of 2 ranks right after ~2 ms of compute, 4 B to "
        "64 MiB, fitted as a 2-rank ring (2 x 130 us + bytes / 1.15 GB/s); benchmarks/RESULTS.md"
    ),
    op_overhead_s=360e-6,
    op_overhead_source=(
        "python benchmarks/runtime_overhead.py --repeats 3 --steps 12, 2026-12-06 19:37 UTC, "
        "load 0.2-1.2 (quiet), this project's 2-core VM, plan run's defaults (gloo, 1 thread per "
        "rank): the median over the mlp (1f1b; sgd, momentum, adam), gpt2-tiny (gpipe) and "
        "gpt2-tiny (2 replicas) runs' ranks of (send + other) / operations from the run reports; "
        "the optimizer step per parameter byte from the mlp runs' update times; "
        "benchmarks/RESULTS.md"
    ),
    update_s_per_byte=(("sgd", 0.135e-9), ("momentum", 0.287e-9), ("adam", 1.082e-9)),
)
"""gloo on loopback as measured on this project's machine: the ``cpu-loopback`` links."""


def with_loopback_links(topology: Topology, links: LoopbackLinks = CPU_LOOPBACK) -> Topology:
    """``topology`` with its innermost level's links, the per-process memory and the runtime's
    per-operation overhead of CPU processes talking over gloo on loopback (:data:`CPU_LOOPBACK`),
    named ``cpu-loopback``; levels across machines keep their links (gloo between machines goes
    over their network).

    Example:
        >>> t = with_loopback_links(Topology.from_args(gpus=4))
        >>> t.name, t.levels[0].latency_s == CPU_LOOPBACK.latency_s, t.process_bytes > 0
        ('cpu-loopback', True, True)
        >>> t.op_overhead_s == CPU_LOOPBACK.op_overhead_s > 0
        True
    """
    inner = Level(
        devices=topology.levels[0].devices,
        bandwidth_bytes_per_s=links.bandwidth_bytes_per_s,
        latency_s=links.latency_s,
        allreduce_bandwidth_bytes_per_s=links.allreduce_bandwidth_bytes_per_s,
        allreduce_latency_s=links.allreduce_latency_s,
    )
    return Topology(
        levels=(inner, *topology.levels[1:]),
        memory_bytes=topology.memory_bytes,
        name=CPU_LOOPBACK_NAME,
        process_bytes=links.process_bytes,
        op_overhead_s=links.op_overhead_s,
        update_s_per_byte=links.update_s_per_byte,
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


_UNITS = {"": GB, "gb/s": GB, "gbps": GB / 8, "gbit/s": GB / 8, "mb/s": 1e6, "b/s": 1.0}


def parse_bandwidth(text: str) -> float:
    """Bytes/s from ``"25"`` (GB/s), ``"25GB/s"``, ``"100Gbit/s"``, ``"100gbps"`` or ``"800MB/s"``."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z/]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise TopologyError(
            f"cannot read bandwidth {text!r}; give GB/s as a number (25) or with a unit: "
            "25GB/s, 100Gbit/s, 800MB/s"
        )
    try:
        value = float(match.group(1)) * _UNITS[unit]
    except ValueError:
        raise TopologyError(f"cannot read bandwidth {text!r}; give a number such as 25") from None
    if not math.isfinite(value) or value <= 0:
        raise TopologyError(f"bandwidth must be positive, got {text!r}")
    return value
