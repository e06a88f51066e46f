"""The simulator's event loop: devices advance through their operation lists as far as their
inputs allow; see :mod:`planner.simulate` for what is modelled.

Every forward, backward and weight-gradient operation also costs its device the topology's
:attr:`planner.topology.Topology.op_overhead_s` (the runtime's own work per operation: posting
sends and receives, bookkeeping; measured for the ``cpu-loopback`` preset by
``benchmarks/runtime_overhead.py``, 0 for other topologies): the operation's event spans its
compute plus that overhead, and what it sends leaves at the end of both. A stage's optimizer
step (:attr:`planner.simulate.SimStage.update_s`, from ``Topology.update_s_per_byte``) is an
``update`` event on each of its devices right after the all-reduce, or where one would be: once
per minibatch (``pipedream``: once per round of one microbatch on each replica).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np
import pandas as pd

import planner.simulate as sim
from planner.rank_schedules import rank_orders
from planner.schedules import (
    PER_STAGE_SCHEDULES,
    RANK_SCHEDULES,
    Schedule,
    replica_order,
    splits_backward,
    sync_points,
    sync_unit,
)
from planner.topology import Topology

__all__ = ["Engine"]

_F, _B, _SEND, _RECV, _AR, _BI, _W, _UP = range(8)  # codes of planner.simulate.EVENT_KINDS
_COMPUTE = (_F, _B, _BI, _W, _UP)


class Engine:
    """The event loop over ``stages`` (checked by :func:`planner.simulate.simulate_stages`)."""

    def __init__(
        self,
        stages: Sequence[sim.SimStage],
        schedule: Schedule,
        microbatches: int,
        minibatches: int,
        topology: Topology | None,
        microbatch_size: int,
        chunks: int,
    ) -> None:
        self.stages, self.schedule, self.topology = list(stages), schedule, topology
        self.op_overhead_s = topology.op_overhead_s if topology is not None else 0.0
        self.M, self.N, self.mb_size = microbatches, minibatches, microbatch_size
        self.chunks = chunks
        self.total = microbatches * minibatches
        replicas = [len(st.ranks) for st in stages]
        self.devices: list[tuple[int, int, int]] = []  # (rank, first stage, replica)
        # per device: (kind, stage, microbatch over the run; for _AR the last one it covers)
        self.ops: list[list[tuple[int, int, int]]] = []
        num = len(stages)
        self.dev_of = [[0] * self.total for _ in range(num)]
        if schedule in RANK_SCHEDULES:
            split = splits_backward(schedule)
            kinds = {"F": _F, "B": _BI if split else _B, "W": _W}
            orders = rank_orders(
                schedule, ranks=num // chunks, microbatches=microbatches, chunks=chunks
            )
            for r, order in enumerate(orders):
                self.devices.append((stages[r].ranks[0], r, 0))
                held = sorted({op.stage or 0 for op in order})
                ops = []
                for k in range(self.N):
                    ops += [
                        (kinds[op.kind], op.stage or 0, k * self.M + op.microbatch) for op in order
                    ]
                    # after the minibatch the rank's optimizer steps each of its chunks
                    ops += [
                        (_AR, c, k * self.M + self.M - 1) for c in held if stages[c].update_s > 0
                    ]
                self.ops.append(ops)
        else:
            for s, st in enumerate(stages):
                for r, rank in enumerate(st.ranks):
                    self.devices.append((rank, s, r))
                    self.ops.append(
                        self._device_ops(replicas, s, r, len(st.ranks) > 1 or st.update_s > 0)
                    )
        self.stages_of: list[tuple[int, ...]] = []
        for d, ops in enumerate(self.ops):
            mine = set()
            for kind, s, g in ops:
                if kind == _F:
                    self.dev_of[s][g] = d
                    mine.add(s)
            self.stages_of.append(tuple(sorted(mine)) or (self.devices[d][1],))
        nan = math.nan
        self.fwd_in = [[0.0 if s == 0 else nan] * self.total for s in range(num)]
        self.grad_in = [[0.0 if s == num - 1 else nan] * self.total for s in range(num)]
        self.waiting: dict[tuple[int, int, int], int] = {}
        self.link_free: dict[tuple[int, int], float] = {}
        self.link_busy: dict[tuple[int, int], list[tuple[float, float]]] = {}
        self.groups: dict[tuple[int, int], list[int]] = {}  # (stage, minibatch) -> arrived
        self.group_t: dict[tuple[int, int], float] = {}
        self.ptr = [0] * len(self.devices)
        self.free = [0.0] * len(self.devices)
        self.in_flight = [0] * len(self.devices)
        self.mem_t: list[list[float]] = []
        self.mem_v: list[list[float]] = []
        for d in range(len(self.devices)):  # a rank holds every stage (chunk) it runs
            self.mem_t.append([0.0])
            self.mem_v.append([sum(stages[s].static_bytes for s in self.stages_of[d])])
        # (device, kind, microbatch, minibatch, start, end, peer, bytes, stage)
        self.ev: list[tuple[int, int, int, int, float, float, int, float, int]] = []
        self.queue: deque[int] = deque(range(len(self.devices)))

    def _device_ops(
        self, replicas: list[int], s: int, r: int, reduce: bool
    ) -> list[tuple[int, int, int]]:
        """The device's op list from planner.schedules, with an all-reduce (and optimizer step)
        per minibatch when ``reduce``."""
        kinds = {"F": _F, "B": _B}
        schedule = self.schedule
        assert schedule in PER_STAGE_SCHEDULES
        if schedule is Schedule.PIPEDREAM:
            ops = [
                (kinds[op.kind], s, op.microbatch)
                for op in replica_order(
                    schedule, replicas=replicas, stage=s, replica=r, microbatches=self.total
                )
            ]
        else:
            base = replica_order(
                schedule, replicas=replicas, stage=s, replica=r, microbatches=self.M
            )
            ops = [
                (kinds[op.kind], s, k * self.M + op.microbatch)
                for k in range(self.N)
                for op in base
            ]
        if not reduce:
            return ops
        points = sync_points(
            schedule,
            replicas=replicas,
            stage=s,
            replica=r,
            microbatches=self.M,
            minibatches=self.N,
        )
        unit = sync_unit(schedule, replicas=replicas[s], microbatches=self.M)
        out: list[tuple[int, int, int]] = []
        start = 0
        for j, point in enumerate(points):  # an all-reduce names the last microbatch it covers
            out.extend(ops[start:point])
            out.append((_AR, s, min((j + 1) * unit, self.total) - 1))
            start = point
        out.extend(ops[start:])
        return out

    def run(self) -> sim.SimulationResult:
        while self.queue:
            self._advance(self.queue.popleft())
        stuck = [
            self.devices[d][0] for d in range(len(self.devices)) if self.ptr[d] < len(self.ops[d])
        ]
        assert not stuck, f"schedule deadlocked on ranks {stuck}"
        return self._result()

    def _advance(self, d: int) -> None:
        """Run device ``d``'s ops until one needs an input that has not been produced yet."""
        rank = self.devices[d][0]
        ops, ev = self.ops[d], self.ev
        mem_t, mem_v = self.mem_t[d], self.mem_v[d]
        i, t = self.ptr[d], self.free[d]
        last = len(self.stages) - 1
        overhead = self.op_overhead_s  # the runtime's own time per F, B or W on this device
        while i < len(ops):
            kind, s, g = ops[i]
            st = self.stages[s]
            if kind == _AR:
                key = (s, g)
                arrived = self.groups.setdefault(key, [])
                arrived.append(d)
                self.group_t[key] = max(self.group_t.get(key, 0.0), t)
                self.ptr[d], self.free[d] = i, t
                if len(arrived) < len(st.ranks):
                    return  # the last replica to arrive releases the others
                start = self.group_t[key]
                end = start + st.allreduce_s
                done = end + st.update_s  # then each replica steps its optimizer
                for m in arrived:
                    if end > start:
                        ev.append((m, _AR, -1, g // self.M, start, end, -1, 0.0, s))
                    if done > end:
                        ev.append((m, _UP, -1, g // self.M, end, done, -1, 0.0, s))
                    self.free[m] = done
                    self.ptr[m] += 1
                    if m != d:
                        self.queue.append(m)
                i, t = self.ptr[d], done
                continue
            if kind == _W:  # the weight gradient follows this device's own B: no input
                start, end = t, t + st.backward_weight_s + overhead
                if st.weight_held_bytes:
                    mem_t.append(end)
                    mem_v.append(mem_v[-1] - st.weight_held_bytes)
                ev.append((d, kind, g, g // self.M, start, end, -1, 0.0, s))
                t = end
                i += 1
                continue
            ready = (self.fwd_in if kind == _F else self.grad_in)[s][g]
            if ready != ready:  # nan: the input has not been produced yet
                self.waiting[(_F if kind == _F else _B, s, g)] = d
                break
            start = t if t > ready else ready
            if kind == _F:
                end = start + st.forward_s + overhead
                n = self.in_flight[d]
                mem_t.append(start)
                mem_v.append(mem_v[-1] + st.activation_bytes + (st.stash_bytes if n else 0.0))
                self.in_flight[d] = n + 1
                if s < last:
                    self._send(d, rank, s + 1, g, end, st.send_bytes, _F)
            else:
                end = (
                    start
                    + st.backward_s
                    - (st.backward_weight_s if kind == _BI else 0.0)
                    + overhead
                )
                n = self.in_flight[d] - 1
                if st.backward_extra_bytes:
                    mem_t.append(start)
                    mem_v.append(mem_v[-1] + st.backward_extra_bytes)
                    mem_t.append(end)
                    mem_v.append(mem_v[-1] - st.backward_extra_bytes)
                held = st.weight_held_bytes if kind == _BI else 0.0  # kept until the W
                mem_t.append(end)
                mem_v.append(
                    mem_v[-1] - st.activation_bytes + held - (st.stash_bytes if n else 0.0)
                )
                self.in_flight[d] = n
                if s > 0:
                    self._send(d, rank, s - 1, g, end, self.stages[s - 1].send_bytes, _B)
            ev.append((d, kind, g, g // self.M, start, end, -1, 0.0, s))
            t = end
            i += 1
        self.ptr[d], self.free[d] = i, t

    def _send(
        self, d: int, src: int, stage: int, g: int, ready: float, nbytes: float, kind: int
    ) -> None:
        """Send microbatch ``g``'s activations (kind F) or gradients (B) to ``stage``."""
        dd = self.dev_of[stage][g]
        dst = self.devices[dd][0]
        arrive = ready
        if self.topology is not None and nbytes > 0 and dst != src:
            key = (src, dst)
            level = self.topology.link_level(src, dst)
            start = max(ready, self.link_free.get(key, 0.0))
            arrive = start + self.topology.transfer_s(nbytes, level)
            self.link_free[key] = arrive
            self.link_busy.setdefault(key, []).append((start, arrive))
            here = stage - 1 if kind == _F else stage + 1
            self.ev.append((d, _SEND, g, g // self.M, start, arrive, dst, nbytes, here))
            self.ev.append((dd, _RECV, g, g // self.M, start, arrive, src, nbytes, stage))
        (self.fwd_in if kind == _F else self.grad_in)[stage][g] = arrive
        waiter = self.waiting.pop((kind, stage, g), None)
        if waiter is not None:
            self.queue.append(waiter)

    # --- summarising -----------------------------------------------------------------------

    def _result(self) -> sim.SimulationResult:
        cols = list(zip(*self.ev, strict=True))
        dev = np.asarray(cols[0], dtype=np.int64)
        kind = np.asarray(cols[1], dtype=np.int64)
        start = np.asarray(cols[4], dtype=float)
        end = np.asarray(cols[5], dtype=float)
        minibatch = np.asarray(cols[3], dtype=np.int64)
        done = np.zeros(self.N)
        np.maximum.at(done, minibatch, end)  # each minibatch ends with its last operation
        lo, hi = sim.steady_window(
            self.schedule, devices=len(self.devices), microbatches=self.M, minibatches=self.N
        )
        if self.schedule is Schedule.PIPEDREAM:
            lo, hi = _whole_periods(done, lo, hi)
        w0, w1 = (0.0, float(done[0])) if hi == 0 else (float(done[lo]), float(done[hi]))
        minibatch_s = (w1 - w0) / max(hi - lo, 1)
        span = max(w1 - w0, 1e-300)
        clipped = np.clip(end, w0, w1) - np.clip(start, w0, w1)
        ndev = len(self.devices)
        busy = np.isin(kind, _COMPUTE)
        compute = np.bincount(dev[busy], clipped[busy], minlength=ndev) / span
        reduce = np.bincount(dev[kind == _AR], clipped[kind == _AR], minlength=ndev) / span
        peaks = [max(v) for v in self.mem_v]
        devices = tuple(
            sim.DeviceStats(
                rank=rank,
                stage=s,
                replica=r,
                compute_fraction=float(compute[d]),
                allreduce_fraction=float(reduce[d]),
                idle_fraction=float(max(0.0, 1.0 - compute[d] - reduce[d])),
                peak_memory_bytes=float(peaks[d]),
                stages=self.stages_of[d],
            )
            for d, (rank, s, r) in enumerate(self.devices)
        )
        links = []
        for (src, dst), spans in self.link_busy.items():
            busy = np.asarray(spans)
            used = float(np.sum(np.clip(busy[:, 1], w0, w1) - np.clip(busy[:, 0], w0, w1)))
            links.append(
                sim.LinkStats(
                    src=src,
                    dst=dst,
                    level=self.topology.link_level(src, dst) if self.topology else 0,
                    busy_fraction=used / span,
                )
            )
        links.sort(key=lambda link: (-link.busy_fraction, link.src, link.dst))
        busiest: dict[int, float] = {}
        for stats in devices:
            busiest[stats.stage] = max(
                busiest.get(stats.stage, 0.0), stats.compute_fraction + stats.allreduce_fraction
            )
        critical = max(busiest, key=lambda s: (round(busiest[s], 6), self._stage_time(s)))
        ranks = np.asarray([rank for rank, _, _ in self.devices], dtype=np.int64)
        stage = np.asarray([s for _, s, _ in self.devices], dtype=np.int64)
        replica = np.asarray([r for _, _, r in self.devices], dtype=np.int64)
        events = pd.DataFrame(
            {
                "rank": ranks[dev],
                "stage": np.asarray(cols[8], dtype=np.int64),
                "replica": replica[dev],
                "kind": pd.Categorical.from_codes(kind, categories=list(sim.EVENT_KINDS)),
                "microbatch": np.asarray(cols[2], dtype=np.int64),
                "minibatch": minibatch,
                "start_s": start,
                "end_s": end,
                "peer": np.asarray(cols[6], dtype=np.int64),
                "bytes": np.asarray(cols[7], dtype=float),
            }
        ).sort_values(["start_s", "rank"], kind="stable", ignore_index=True)
        sizes = [len(t) for t in self.mem_t]
        memory = pd.DataFrame(
            {
                "rank": np.repeat(ranks, sizes),
                "stage": np.repeat(stage, sizes),
                "time_s": np.concatenate([np.asarray(t) for t in self.mem_t]),
                "bytes": np.concatenate([np.asarray(v) for v in self.mem_v]),
            }
        )
        samples = self.M * self.mb_size
        return sim.SimulationResult(
            schedule=self.schedule,
            microbatches=self.M,
            minibatches=self.N,
            samples_per_minibatch=samples,
            minibatch_s=minibatch_s,
            first_minibatch_s=float(done[0]),
            makespan_s=float(end.max()),
            samples_per_s=samples / minibatch_s if minibatch_s > 0 else math.inf,
            window_s=(w0, w1),
            critical_stage=critical,
            devices=devices,
            links=tuple(links),
            memory_limit_bytes=None if self.topology is None else self.topology.memory_bytes,
            events=events,
            memory=memory,
            chunks=self.chunks,
        )

    def _stage_time(self, s: int) -> float:
        st = self.stages[s]
        return (st.forward_s + st.backward_s) / len(st.ranks)


def _whole_periods(done: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Shrink the window ``lo..hi`` to whole periods of the steady state, if it has one.

    Round-robin replication makes a steady state periodic over several minibatches (e.g. every
    round of replicas ends with its all-reduce), so a window over part of a period would be off.
    """
    steps = np.diff(done[lo : hi + 1])
    scale = max(float(np.abs(steps).max(initial=0.0)), 1e-300)
    for period in range(1, len(steps) // 2 + 1):
        if np.allclose(steps[period:], steps[:-period], rtol=1e-9, atol=1e-9 * scale):
            return hi - (len(steps) // period) * period, hi
    return lo, hi
