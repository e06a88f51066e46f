"""PipeDream's asynchronous 1F1B with weight stashing against a replay of its version semantics.

The reference runs in one process, microbatch after microbatch, with every stage's weight
versions kept explicitly: the version a stage's forward of microbatch ``m`` sees is the number of
updates that stage's operation list puts before ``F m``; its backward uses the same version; each
update applies the mean gradient of the round it closes. It shares only the stage cutting
(tested on its own in test_stage.py) with the runtime, not the stash or the executor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_helpers import assert_matches_reference, make_plan, run_cases

from planner.errors import PlannerError
from planner.models import load_model
from planner.plan import Plan
from planner.profile.capture import capture
from planner.runtime.data import microbatch, minibatch_seed
from planner.runtime.pipedream import WeightStash
from planner.runtime.stage import build_stage_module, cut_graph
from planner.runtime.worker import prepare
from planner.schedules import Schedule, replica_order, sync_points

MLP, CNN, GPT = "runtime_models:mlp", "runtime_models:cnn", "gpt2-tiny"
STEPS, LR = 3, 0.1

CASES = {  # name -> (model, plan arguments, update interval)
    "mlp-2-stages": (MLP, dict(cuts=["_3"], replicas=[1, 1]), 1),
    "mlp-4-stages": (MLP, dict(cuts=["_2", "_4", "_6"], replicas=[1, 1, 1, 1]), 1),
    "cnn-relay-3-stages": (CNN, dict(cuts=["relu_1", "block1_conv2"], replicas=[1, 1, 1]), 1),
    "gpt-2-to-1": (GPT, dict(cuts=["blocks_1_ln1"], replicas=[2, 1], microbatch_size=1), 1),
    "mlp-1-to-2-interval-2": (MLP, dict(cuts=["_3"], replicas=[1, 2]), 2),
    "mlp-3-stages-recompute": (MLP, dict(cuts=["_2", "_5"], replicas=[1, 1, 1], recompute=True), 1),
}


def pipedream_reference(
    model: str, plan: Plan, *, steps: int, lr: float, interval: int
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Final parameters (by name) and per-step mean losses under PipeDream's semantics."""
    spec = load_model(model, batch_size=plan.microbatch_size, seed=0)
    captured = capture(spec.module)
    cut = cut_graph(captured, [s.layers for s in plan.stages])
    modules = [build_stage_module(captured, cut, s) for s in range(len(plan.stages))]
    replicas = tuple(s.replicas for s in plan.stages)
    m_count, total = plan.microbatches, plan.microbatches * steps
    seen: list[dict[int, int]] = []  # per stage: microbatch -> version its forward sees
    for s, count in enumerate(replicas):
        versions: dict[int, int] = {}
        for r in range(count):
            ops = replica_order(
                Schedule.PIPEDREAM, replicas=replicas, stage=s, replica=r, microbatches=total
            )
            points = sync_points(
                Schedule.PIPEDREAM,
                replicas=replicas,
                stage=s,
                replica=r,
                microbatches=m_count,
                minibatches=steps,
            )[interval - 1 :: interval]
            for i, op in enumerate(ops):
                if op.kind == "F":
                    versions[op.microbatch] = sum(1 for p in points if p <= i)
        seen.append(versions)
    history = [[{n: p.detach().clone() for n, p in m.named_parameters()}] for m in modules]
    grads: list[dict[str, torch.Tensor]] = [{} for _ in modules]
    done = [0] * len(modules)
    losses: list[float] = []
    for g in range(total):
        batch = spec.make_batch(plan.minibatch_size, minibatch_seed(0, g // m_count))
        inputs, targets = microbatch(batch, g % m_count, size=plan.microbatch_size)
        weights = [
            {n: t.clone().requires_grad_() for n, t in history[s][seen[s][g]].items()}
            for s in range(len(modules))
        ]
        values: tuple = tuple(inputs)
        for s, module in enumerate(modules):
            out = torch.func.functional_call(module, weights[s], values)
            values = out
        loss = spec.loss_fn(values, targets)
        loss.backward()
        losses.append(loss.item())
        for s, count in enumerate(replicas):
            for n, w in weights[s].items():
                grads[s][n] = grads[s].get(n, 0) + w.grad
            done[s] += 1
            if done[s] == count * interval:  # the round closes: one update of the stage
                latest = history[s][-1]
                history[s].append(
                    {n: latest[n] - lr * grads[s][n] / (count * interval) for n in latest}
                )
                grads[s], done[s] = {}, 0
    final = {n: t for h in history for n, t in h[-1].items()}
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
        overrides={n: {"update_interval": c[2]} for n, c in CASES.items()},
    )
    return {"plans": plans, "results": results}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_pipedream_matches_the_weight_version_replay(trained: dict, case: str) -> None:
    model, _, interval = CASES[case]
    plan = trained["plans"][case]
    expected, losses = pipedream_reference(model, plan, steps=STEPS, lr=LR, interval=interval)
    assert_matches_reference(model, trained["results"][case], expected, losses)


@pytest.mark.distributed
@pytest.mark.parametrize("case", [c for c in CASES if "-to-" not in c])
def test_stashed_versions_never_exceed_s_minus_s(trained: dict, case: str) -> None:
    plan = trained["plans"][case]
    stages = len(plan.stages)
    for result in trained["results"][case].values():
        used, limit = result["versions"]
        s = result["stage"]
        assert limit == stages - s
        assert 1 <= used <= stages - s
    first = next(r for r in trained["results"][case].values() if r["stage"] == 0)
    assert first["versions"][0] == min(stages, plan.microbatches * STEPS)  # the bound is reached


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
