"""PipeDream's asynchronous 1F1B with weight stashing against a replay of its version semantics.

The reference runs in one process, microbatch after microbatch, with every stage's weight
versions kept explicitly. Which version each forward sees is derived here from the schedule's
definition (DESIGN.md, PipeDream SOSP'19 §3.3), not taken from :mod:`planner.schedules`:

* stage ``s`` admits one microbatch per device from ``s`` to the end (``D_s`` devices) before
  its first backward, then alternates one forward and one backward (1F1B): in the stage's order
  the forward of microbatch ``g`` comes after ``max(0, g - D_s + 1)`` backwards;
* its ``R`` replicas take microbatches round-robin (``g`` on replica ``g % R``) and update
  together once per round of ``R`` consecutive microbatches, when the round's last backward
  is done (every ``k``-th round with ``--update-interval k``), applying the mean gradient;
* so ``F g`` and ``B g`` see version ``floor(max(0, g - D_s + 1) / (R k))``, and a replica
  holds at once the versions of its microbatches in flight.

Each update runs the plan's optimizer (a torch optimizer over the reference's own copy of the
stage's live weights). It shares only the stage cutting (tested on its own in test_stage.py)
with the runtime, not the schedule lists, the stash or the executor.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from runtime_helpers import assert_matches_reference, make_plan, run_cases, torch_optimizer

from planner.errors import PlannerError
from planner.models import load_model
from planner.plan import Plan
from planner.profile.capture import capture
from planner.runtime.data import microbatch, minibatch_seed
from planner.runtime.pipedream import WeightStash
from planner.runtime.stage import build_stage_module, cut_graph
from planner.runtime.worker import prepare

MLP, CNN, GPT, BN = "runtime_models:mlp", "runtime_models:cnn", "gpt2-tiny", "runtime_models:cnn_bn"
STEPS, LR = 3, 0.1

CASES = {  # name -> (model, plan arguments, update interval)
    "mlp-2-stages": (MLP, dict(cuts=["_3"], replicas=[1, 1]), 1),
    "mlp-4-stages": (MLP, dict(cuts=["_2", "_4", "_6"], replicas=[1, 1, 1, 1]), 1),
    "cnn-relay-3-stages": (CNN, dict(cuts=["relu_1", "block1_conv2"], replicas=[1, 1, 1]), 1),
    "gpt-2-to-1": (GPT, dict(cuts=["blocks_1_ln1"], replicas=[2, 1], microbatch_size=1), 1),
    "mlp-1-to-2-interval-2": (MLP, dict(cuts=["_3"], replicas=[1, 2]), 2),
    "mlp-3-stages-recompute": (MLP, dict(cuts=["_2", "_5"], replicas=[1, 1, 1], recompute=True), 1),
    "mlp-2-1-1-adam": (MLP, dict(cuts=["_3", "_5"], replicas=[2, 1, 1], optimizer="adam"), 1),
    "mlp-1-to-3-momentum-wd": (
        MLP,
        dict(cuts=["_3"], replicas=[1, 3], optimizer="momentum", weight_decay=0.01),
        1,
    ),
    "bn-3-stages-momentum": (
        BN,
        dict(cuts=["relu", "bn2"], replicas=[1, 1, 1], optimizer="momentum"),
        1,
    ),
}
# momentum 0.9 updating per microbatch makes lr 0.1 an effective step of 1: training diverges
# and amplifies rounding; smaller rates keep the comparison meaningful at default tolerances
LRS = {"mlp-2-1-1-adam": 0.01, "bn-3-stages-momentum": 0.01, "mlp-1-to-3-momentum-wd": 0.02}


def forward_version(plan: Plan, stage: int, g: int, interval: int) -> int:
    """The weight version ``F g`` and ``B g`` of ``stage`` see (module docstring)."""
    replicas = [s.replicas for s in plan.stages]
    devices_from = sum(replicas[stage:])
    return max(0, g - devices_from + 1) // (replicas[stage] * interval)


def most_versions(plan: Plan, stage: int, replica: int, total: int, interval: int) -> int:
    """Most versions one replica holds at once: distinct versions of its microbatches in flight.

    The stage's order, from the definition: ``D_s - 1`` forwards, then ``F(g + D_s - 1), B g``
    pairs, then the remaining backwards; the replica runs its own microbatches of it.
    """
    replicas = [s.replicas for s in plan.stages]
    warm = min(sum(replicas[stage:]) - 1, total)
    order = [("F", g) for g in range(warm)]
    for g in range(total - warm):
        order += [("F", g + warm), ("B", g)]
    order += [("B", g) for g in range(total - warm, total)]
    held: set[int] = set()
    most = 0
    for kind, g in order:
        if g % replicas[stage] != replica:
            continue
        if kind == "F":
            held.add(g)
            versions = {forward_version(plan, stage, m, interval) for m in held}
            most = max(most, len(versions))
        else:
            held.discard(g)
    return most


def pipedream_reference(
    model: str, plan: Plan, *, steps: int, lr: float, interval: int
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Final parameters and buffers (by name) and per-step mean losses under PipeDream."""
    spec = load_model(model, batch_size=plan.microbatch_size, seed=0)
    captured = capture(spec.module)
    cut = cut_graph(captured, [s.layers for s in plan.stages])
    modules = [build_stage_module(captured, cut, s) for s in range(len(plan.stages))]
    replicas = tuple(s.replicas for s in plan.stages)
    m_count, total = plan.microbatches, plan.microbatches * steps
    live = [
        {n: torch.nn.Parameter(p.detach().clone()) for n, p in m.named_parameters()}
        for m in modules
    ]
    opts = [
        torch_optimizer(
            list(params.values()),
            kind=str(plan.optimizer),
            lr=lr,
            momentum=0.9 if str(plan.optimizer) == "momentum" else 0.0,
            weight_decay=plan.weight_decay,
        )
        if params
        else None
        for params in live
    ]
    history = [[{n: p.detach().clone() for n, p in params.items()}] for params in live]
    grads: list[dict[str, torch.Tensor]] = [{} for _ in modules]
    done = [0] * len(modules)
    losses: list[float] = []
    for g in range(total):
        batch = spec.make_batch(plan.minibatch_size, minibatch_seed(0, g // m_count))
        inputs, targets = microbatch(batch, g % m_count, size=plan.microbatch_size)
        weights = []
        for s in range(len(modules)):
            version = forward_version(plan, s, g, interval)
            assert version < len(history[s]), "a forward would see an update not yet made"
            weights.append({n: t.clone().requires_grad_() for n, t in history[s][version].items()})
        values: tuple = tuple(inputs)
        for s, module in enumerate(modules):
            values = torch.func.functional_call(module, weights[s], values)
        loss = spec.loss_fn(values, targets)
        loss.backward()
        losses.append(loss.item())
        for s, count in enumerate(replicas):
            for n, w in weights[s].items():
                grads[s][n] = grads[s].get(n, 0) + w.grad
            done[s] += 1
            if done[s] == count * interval:  # the round closes: one update of the stage
                for n, p in live[s].items():
                    p.grad = grads[s][n] / (count * interval)
                if opts[s] is not None:
                    opts[s].step()
                history[s].append({n: p.detach().clone() for n, p in live[s].items()})
                grads[s], done[s] = {}, 0
    final = {n: t for h in history for n, t in h[-1].items()}
    for module in modules:
        final |= {n: b.detach().clone() for n, b in module.named_buffers()}
    per_step = [sum(losses[k * m_count : (k + 1) * m_count]) / m_count for k in range(steps)]
    return final, per_step


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    plans = {
        name: make_plan(model, schedule="pipedream", **kw) for name, (model, kw, _) in CASES.items()
    }
    results = run_cases(
        plans,
        Path(tmp_path_factory.mktemp("pd")),
        steps=STEPS,
        lr=LR,
        overrides={
            n: {"update_interval": c[2], "lr": LRS.get(n, LR), "momentum": None}
            for n, c in CASES.items()
        },
    )
    return {"plans": plans, "results": results}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_pipedream_matches_the_weight_version_replay(trained: dict, case: str) -> None:
    model, _, interval = CASES[case]
    plan = trained["plans"][case]
    lr = LRS.get(case, LR)
    expected, losses = pipedream_reference(model, plan, steps=STEPS, lr=lr, interval=interval)
    assert_matches_reference(model, trained["results"][case], expected, losses)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_stashed_versions_stay_within_the_definition(trained: dict, case: str) -> None:
    """Each replica's version limit is its microbatches in flight, ceil(D_s / R_s) (S - s when
    unreplicated), and it held exactly as many versions as the definition implies."""
    plan = trained["plans"][case]
    interval = CASES[case][2]
    replicas = [s.replicas for s in plan.stages]
    total = plan.microbatches * STEPS
    for rank, result in trained["results"][case].items():
        used, limit = result["versions"]
        s = result["stage"]
        replica = plan.stages[s].ranks.index(rank)
        assert limit == min(math.ceil(sum(replicas[s:]) / replicas[s]), total)
        if all(r == 1 for r in replicas[s:]):  # a straight pipeline from s on
            assert limit == len(replicas) - s
        assert used == most_versions(plan, s, replica, total, interval)
        assert 1 <= used <= limit
    first = next(r for r in trained["results"][case].values() if r["stage"] == 0)
    if replicas[0] == 1 and interval == 1:  # the bound is reached
        assert first["versions"][0] == first["versions"][1] == min(sum(replicas), total)


def test_version_definition_examples() -> None:
    """Hand-checked: 2 stages, stage 0 admits 2 microbatches, so F2 is the first after B0."""
    plan = make_plan(MLP, cuts=["_3"], replicas=[1, 1], schedule="pipedream")
    assert [forward_version(plan, 0, g, 1) for g in range(5)] == [0, 0, 1, 2, 3]
    assert [forward_version(plan, 1, g, 1) for g in range(3)] == [0, 1, 2]
    assert most_versions(plan, 0, 0, 12, 1) == 2 and most_versions(plan, 1, 0, 12, 1) == 1
    replicated = make_plan(MLP, cuts=["_3"], replicas=[2, 1], schedule="pipedream")
    # D_0 = 3, R = 2: updates after B1 (round 0,1) and B3; F g sees floor((g - 2) / 2)
    assert [forward_version(replicated, 0, g, 1) for g in range(7)] == [0, 0, 0, 0, 1, 1, 2]


def test_stash_accounts_for_versions_and_moves_gradients() -> None:
    module = torch.nn.Linear(2, 1, bias=False)
    stash = WeightStash(module, limit=2)
    w0 = stash.forward_weights(0)["weight"]
    stash.forward_weights(1)
    (w0.sum() * 2).backward()
    stash.backward_done(0)
    torch.testing.assert_close(module.weight.grad, torch.full((1, 2), 2.0))
    with torch.no_grad():
        module.weight.sub_(1.0)
    stash.updated()
    w2 = stash.forward_weights(2)["weight"]
    assert stash.versions == 2 and stash.version_of(1) == 0 and stash.version_of(2) == 1
    torch.testing.assert_close(w2, w0.detach() - 1.0)
    stash.backward_done(1)
    assert stash.versions == 1  # version 0 released once its last microbatch finished
    stash.updated()
    with pytest.raises(RuntimeError, match="more than the 1"):
        _two_versions(module)


def _two_versions(module: torch.nn.Module) -> None:
    stash = WeightStash(module, limit=1)
    stash.forward_weights(0)
    stash.updated()
    stash.forward_weights(1)


def test_pipedream_refuses_tied_weights_across_stages() -> None:
    plan = make_plan(
        "runtime_models:gpt_tied", cuts=["ln_f"], replicas=[1, 1], schedule="pipedream"
    )
    spec = load_model("runtime_models:gpt_tied", batch_size=plan.microbatch_size)
    with pytest.raises(PlannerError, match="drift apart"):
        prepare(plan, spec, rank=0, world_size=2)
