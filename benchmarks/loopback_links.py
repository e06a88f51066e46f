"""gloo on loopback: point-to-point latency and bandwidth between 2 local ranks, and a rank's
fixed memory; the numbers behind the ``cpu-loopback`` topology preset (planner/topology.py).

Two spawned processes on this machine, one CPU thread each (what ``plan run`` gives a rank of a
2-rank run on 2 cores), join a gloo group on 127.0.0.1 and ping-pong float32 tensors with
``isend``/``irecv`` and ``wait``, the calls the runtime's stages use (planner/runtime/comm.py):
rank 0 sends, rank 1 receives and sends back. One way is half a round trip. Per size the
fastest of ``--iters`` round trips is kept for the fit, and the median is printed beside it: on a
busy machine a message often waits a scheduler tick (~2 ms) for its receiver to get a core, which
the median shows and the fastest leaves out, as the CPU-time profiles leave out the time other
jobs hold the core (both predict the machine when quiet). A line
``t = latency + bytes / bandwidth`` is fitted by least squares on the relative error (so the
small messages fix the latency and the large ones the bandwidth).

The gradient all-reduce is timed as the runtime calls it: each rank first computes (a fixed
burst of matrix products, ~2 ms, as a backward ends) and then calls ``all_reduce``; the median
per size is fitted as a 2-rank ring, ``t = 2 latency + bytes / bandwidth``, which gives the
preset's ``allreduce_latency_s`` and ``allreduce_bandwidth_bytes_per_s`` (gloo sums on the CPU,
in threads that compete with the ranks' own: several times slower than its point-to-point).

Memory: each rank's resident set (``/proc/self/statm``) right after ``import torch``, after
joining the gloo group, and after one tiny training step (a Linear(4, 4) forward, backward and
SGD step, and a 4-float all-reduce): what a rank's process holds before it builds any model, the
fixed part of its memory that no plan's tensors account for.

Usage:
    python benchmarks/loopback_links.py [--iters 50] [--max-mib 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["fit_link", "main"]


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fit_link(sizes_bytes: list[int], one_way_s: list[float]) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of ``t = latency + bytes / bandwidth``, least squares on
    the relative error.

    Example:
        >>> lat, bw = fit_link([4, 4096, 4 << 20], [1e-4 + n / 2e9 for n in (4, 4096, 4 << 20)])
        >>> round(lat * 1e6, 3), round(bw / 1e9, 3)
        (100.0, 2.0)
    """
    n = np.asarray(sizes_bytes, dtype=float)
    t = np.asarray(one_way_s, dtype=float)
    design = np.stack([np.ones_like(n), n], axis=1) / t[:, None]
    (latency, per_byte), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    return max(float(latency), 0.0), 1.0 / max(float(per_byte), 1e-30)


def _rank(rank: int, port: int, sizes: list[int], iters: int, out: str) -> None:
    rss_import = _rss_bytes()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dist.barrier()
    rss_group = _rss_bytes()
    net = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    dist.all_reduce(torch.ones(4))
    rss_step = _rss_bytes()
    del net, opt
    peer = 1 - rank
    p2p: dict[int, float] = {}
    p2p_median: dict[int, float] = {}
    allreduce: dict[int, float] = {}
    for nbytes in sizes:
        buf = torch.zeros(max(1, nbytes // 4))
        for _ in range(3):  # warm-up round trips
            _ping(rank, peer, buf)
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            _ping(rank, peer, buf)
            samples.append((time.perf_counter() - t0) / 2)
        p2p[nbytes] = min(samples)
        p2p_median[nbytes] = statistics.median(samples)
        dist.barrier()
        ar = []
        work = torch.randn(160, 160)
        for i in range(iters + 3):
            for _ in range(40):  # ~2 ms of compute, as a backward ends before the all-reduce
                work @ work
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            if i >= 3:
                ar.append(time.perf_counter() - t0)
        allreduce[nbytes] = statistics.median(ar)
        dist.barrier()
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "p2p_one_way_s": p2p,
                "p2p_one_way_median_s": p2p_median,
                "allreduce_s": allreduce,
                "rss_import_bytes": rss_import,
                "rss_group_bytes": rss_group,
                "rss_step_bytes": rss_step,
            }
        )
    )


def _ping(rank: int, peer: int, buf: torch.Tensor) -> None:
    if rank == 0:
        dist.isend(buf, dst=peer).wait()
        dist.irecv(buf, src=peer).wait()
    else:
        dist.irecv(buf, src=peer).wait()
        dist.isend(buf, dst=peer).wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50, help="round trips per size (median)")
    parser.add_argument("--max-mib", type=int, default=64, help="largest message, MiB")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    sizes = [4 * 4**k for k in range(20) if 4 * 4**k <= args.max_mib * 2**20]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(_free_port(), sizes, args.iters, out), nprocs=2)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    one_way = [ranks[0]["p2p_one_way_s"][str(n)] for n in sizes]
    latency, bandwidth = fit_link(sizes, one_way)
    reduce = [ranks[0]["allreduce_s"][str(n)] for n in sizes]
    ring_two_latency, ring_bandwidth = fit_link(sizes, reduce)
    when = datetime.datetime.now(datetime.timezone.utc)
    print(
        f"{when:%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {os.cpu_count()} cores, load "
        f"before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; gloo on 127.0.0.1, 2 ranks, "
        f"1 thread each, fastest (and median) of {args.iters} round trips"
    )
    print(
        f"{'bytes':>10} {'one way us':>11} {'median us':>10} {'fit us':>8} "
        f"{'all_reduce us':>14} {'fit us':>8}"
    )
    for n, t in zip(sizes, one_way, strict=True):
        ar = ranks[0]["allreduce_s"][str(n)]
        med = ranks[0]["p2p_one_way_median_s"][str(n)]
        ring = ring_two_latency + n / ring_bandwidth  # 2 (m - 1) L + 2 (m - 1) / m * n / B, m = 2
        print(
            f"{n:>10} {t * 1e6:>11.1f} {med * 1e6:>10.1f} {(latency + n / bandwidth) * 1e6:>8.1f} "
            f"{ar * 1e6:>14.1f} {ring * 1e6:>8.1f}"
        )
    mib = 2**20
    rss = {k: max(r[f"rss_{k}_bytes"] for r in ranks) for k in ("import", "group", "step")}
    print(
        f"fit: latency {latency * 1e6:.1f} us, bandwidth {bandwidth / 1e9:.3f} GB/s\n"
        f"all-reduce after compute (median), fitted as a 2-rank ring: latency per step "
        f"{ring_two_latency / 2 * 1e6:.1f} us, bandwidth {ring_bandwidth / 1e9:.3f} GB/s\n"
        f"rank resident set, MiB (larger rank): after import torch {rss['import'] / mib:.0f}, "
        f"after joining gloo {rss['group'] / mib:.0f}, after a tiny training step "
        f"{rss['step'] / mib:.0f}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "when": when.isoformat(timespec="seconds"),
                    "load": load,
                    "sizes_bytes": sizes,
                    "one_way_s": one_way,
                    "latency_s": latency,
                    "bandwidth_bytes_per_s": bandwidth,
                    "allreduce_latency_s": ring_two_latency / 2,
                    "allreduce_bandwidth_bytes_per_s": ring_bandwidth,
                    "ranks": ranks,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
