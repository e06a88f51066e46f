"""Helpers for the runtime tests: plans built directly, a spawn harness, a reference trainer."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from planner.models import load_model
from planner.plan import Plan, PlanStage, Prediction, ProfileRef, file_sha256
from planner.profile.capture import capture
from planner.profile.format import LayerProfile, Profile
from planner.runtime.config import Backend, RunConfig
from planner.runtime.data import microbatch, minibatch_seed
from planner.runtime.stage import propagate
from planner.runtime.worker import DistEnv, load_spec, train
from planner.schedules import OptimizerKind, Schedule
from planner.topology import Topology

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def layer_names(model: str) -> list[str]:
    spec = load_model(model, batch_size=1)
    return [layer.name for layer in capture(spec.module).layers]


def make_plan(
    model: str,
    *,
    cuts: Sequence[str],
    replicas: Sequence[int],
    schedule: Schedule | str = Schedule.ONE_F_ONE_B,
    microbatches: int = 4,
    microbatch_size: int = 2,
    recompute: bool = False,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = None,
) -> Plan:
    """A plan for ``model`` whose stages start at the layers named in ``cuts``."""
    spec = load_model(model, batch_size=microbatch_size)
    captured = capture(spec.module)
    names = [layer.name for layer in captured.layers]
    starts = [0, *(names.index(c) for c in cuts), len(names)]
    stages, rank = [], 0
    for s, count in enumerate(replicas):
        stages.append(
            PlanStage(
                layers=tuple(names[starts[s] : starts[s + 1]]),
                replicas=count,
                ranks=tuple(range(rank, rank + count)),
                compute_s=0.01,
                comm_s=0.0,
                allreduce_s=0.0,
                time_s=0.01,
                memory_bytes=1e6,
            )
        )
        rank += count
    return Plan(
        profile=ProfileRef(
            path="test-profile.json",
            sha256="0" * 64,
            model=model,
            batch_size=microbatch_size,
            graph_hash=captured.graph_hash,
            input_shape=spec.input_shape,
        ),
        topology=Topology.from_args(gpus=rank),
        schedule=Schedule(schedule),
        optimizer=OptimizerKind(optimizer),
        weight_decay=weight_decay,
        clip_grad_norm=clip_grad_norm,
        minibatch_size=microbatches * microbatch_size,
        microbatch_size=microbatch_size,
        microbatches=microbatches,
        stages=tuple(stages),
        predicted=Prediction(
            bottleneck_s=0.01,
            minibatch_s=0.1,
            samples_per_s=10.0,
            single_device_s=0.1,
            data_parallel_s=None,
        ),
        recompute=recompute,
    )


def with_profile(plan: Plan, folder: Path, *, forward_ms: float = 0.05) -> Plan:
    """``plan`` with a profile of made-up costs saved as ``folder/profile.json`` (for the
    predicted-vs-measured table); the plan is saved as ``folder/plan.json``."""
    spec = load_model(plan.profile.model, batch_size=plan.microbatch_size)
    captured = capture(spec.module)
    inputs, _ = spec.make_batch(plan.microbatch_size, 0)
    values = propagate(captured, list(inputs))
    layers = []
    for layer in captured.layers:
        out = values[layer.name]
        nbytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0
        params = (
            sum(p.numel() * 4 for p in captured.module.get_submodule(layer.target).parameters())
            if layer.node.op == "call_module"
            else 0
        )
        layers.append(
            LayerProfile(
                name=layer.name,
                op=layer.op,
                forward_ms=forward_ms,
                backward_ms=2 * forward_ms,
                output_bytes=(nbytes,),
                parameter_bytes=params,
                inputs=layer.inputs,
            )
        )
    profile = Profile(
        model=plan.profile.model,
        batch_size=plan.microbatch_size,
        layers=tuple(layers),
        input_shape=spec.input_shape,
        graph_hash=captured.graph_hash,
    )
    profile.save(folder / "profile.json")
    ref = dataclasses.replace(
        plan.profile, path="profile.json", sha256=file_sha256(folder / "profile.json")
    )
    planned = dataclasses.replace(plan, profile=ref)
    planned.save(folder / "plan.json")
    return planned


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, cases: list[tuple[str, str, RunConfig, int]], out: str) -> None:
    """Run every case this rank takes part in; write its result or its error per case."""
    torch.set_num_threads(1)
    for name, plan_json, config, port in cases:
        plan = Plan.from_json(plan_json)
        world = 1 + max(r for s in plan.stages for r in s.ranks)
        if rank >= world:
            continue
        env = DistEnv(rank=rank, world_size=world, master_port=port)
        try:
            result = train(
                plan,
                lambda p=plan, c=config: load_spec(p, seed=c.seed),
                config,
                env,
                return_state=True,
            )
            stats = result.stats
            record: dict[str, Any] = {
                "state": result.state,
                "losses": result.losses,
                "stage": result.stage,
                "error": None,
                "versions": None
                if stats is None
                else (stats.max_weight_versions, stats.weight_version_limit),
            }
        except Exception as exc:  # recorded for the test to report
            record = {"error": f"{type(exc).__name__}: {exc}"}
        torch.save(record, os.path.join(out, f"{name}.rank{rank}.pt"))


def run_cases(
    cases: dict[str, Plan],
    tmp: Path,
    *,
    steps: int = 3,
    lr: float = 0.1,
    momentum: float = 0.0,
    timeout_s: float = 30.0,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[int, Any]]:
    """Train every plan, in order, on one set of spawned local ranks (saves process start-ups).

    ``overrides[name]`` replaces RunConfig fields for one case. Returns, per case, every rank's
    final stage parameters and losses (or its error).
    """
    overrides = overrides or {}
    world = max(1 + max(r for s in p.stages for r in s.ranks) for p in cases.values())
    jobs = []
    for name, plan in cases.items():
        fields: dict[str, Any] = dict(
            plan_path=str(tmp / f"{name}.json"),
            steps=steps,
            lr=lr,
            momentum=momentum,
            timeout_s=timeout_s,
            log_every=0,
            # the CPU reference is compared on the CPU: gloo, one thread, also on a CUDA host
            backend=Backend.GLOO,
            threads=1,
        )
        config = RunConfig(**{**fields, **overrides.get(name, {})})
        jobs.append((name, plan.to_json(), config, free_port()))
    mp.spawn(_rank_main, args=(jobs, str(tmp)), nprocs=world, join=True)
    results: dict[str, dict[int, Any]] = {}
    for name, plan in cases.items():
        ranks = range(1 + max(r for s in plan.stages for r in s.ranks))
        results[name] = {
            r: torch.load(tmp / f"{name}.rank{r}.pt", weights_only=True) for r in ranks
        }
    return results


def torch_optimizer(
    params: list[torch.nn.Parameter],
    *,
    kind: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The reference's optimizer, built from torch directly (not through the runtime's code)."""
    if kind in ("sgd", "momentum"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    assert kind == "adamw", kind
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def reference(
    model: str,
    plan: Plan,
    *,
    steps: int = 3,
    lr: float = 0.1,
    momentum: float = 0.0,
    seed: int = 0,
    optimizer: str = "sgd",
    weight_decay: float = 0.0,
    clip: float | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Single-process training on the same data, microbatch after microbatch (gradients
    accumulated, one optimizer step per minibatch, ``clip_grad_norm_`` before it); parameters
    and buffers by every name, and the losses."""
    torch.manual_seed(seed)
    spec = load_model(model, batch_size=plan.microbatch_size, seed=seed)
    module = spec.module.train()
    params = list(dict.fromkeys(module.parameters()))
    opt = torch_optimizer(
        params, kind=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    losses = []
    for step in range(steps):
        batch = spec.make_batch(plan.minibatch_size, minibatch_seed(seed, step))
        total = 0.0
        for m in range(plan.microbatches):
            inputs, targets = microbatch(batch, m, size=plan.microbatch_size)
            loss = spec.loss_fn(module(*inputs), targets)
            (loss / plan.microbatches).backward()
            total += loss.item()
        losses.append(total / plan.microbatches)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad()
    state = {k: v.detach().clone() for k, v in module.named_parameters(remove_duplicate=False)}
    state |= {k: v.detach().clone() for k, v in module.named_buffers(remove_duplicate=False)}
    return state, losses


def _aliases(model: str) -> list[set[str]]:
    """Names of each distinct parameter of ``model`` (several when tied)."""
    groups: dict[int, set[str]] = {}
    for name, p in load_model(model, batch_size=1).module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return list(groups.values())


def assert_matches_reference(
    model: str,
    results: dict[int, dict[str, Any]],
    expected: dict[str, torch.Tensor],
    losses: list[float],
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Every stage's parameters equal the reference's; every parameter seen at least once.

    ``atol``/``rtol``: torch's float32 defaults unless given (adam on replicated stages: the
    all-reduce sums gradients in another order, and adam divides by their tiny second moments).
    """
    seen = set()
    errors = {r: res["error"] for r, res in results.items() if res["error"]}
    assert not errors, f"ranks failed: {errors}"
    for result in results.values():
        for name, value in result["state"].items():
            torch.testing.assert_close(
                value, expected[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
            )
            seen.add(name)
        if result["losses"] and not all(x != x for x in result["losses"]):
            torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses))
    missing = [names for names in _aliases(model) if not names & seen]
    assert not missing, f"no rank holds {missing}"
