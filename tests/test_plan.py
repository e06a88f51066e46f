import dataclasses
import json

import pytest

from planner.errors import PlanError
from planner.plan import BaselineScore, Plan, PlanStage, Prediction, ProfileRef
from planner.profile import LayerProfile, Profile
from planner.schedules import OptimizerKind, Schedule
from planner.topology import Topology


def _profile():
    layers = tuple(
        LayerProfile(
            name=n,
            op="op",
            forward_ms=1,
            backward_ms=2,
            output_bytes=(8,),
            parameter_bytes=4,
            inputs=inputs,
        )
        for n, inputs in [("a", ()), ("b", (0,)), ("c", (0,)), ("d", (1, 2))]
    )
    return Profile(model="toy", batch_size=4, layers=layers)


def _stage(layers, ranks, time_s=0.1):
    return PlanStage(
        layers=layers,
        replicas=len(ranks),
        ranks=ranks,
        compute_s=0.2,
        comm_s=0.01,
        allreduce_s=0.0,
        time_s=time_s,
        memory_bytes=1e6,
    )


def _plan(stages=None, **kw):
    defaults = dict(
        profile=ProfileRef(path="p.json", sha256="0" * 64, model="toy", batch_size=4),
        topology=Topology.from_args(gpus=4),
        schedule=Schedule.ONE_F_ONE_B,
        optimizer=OptimizerKind.ADAM,
        minibatch_size=16,
        microbatch_size=4,
        microbatches=4,
        stages=stages or (_stage(("a", "c"), (0, 1)), _stage(("b", "d"), (2,), 0.2)),
        predicted=Prediction(
            bottleneck_s=0.2,
            minibatch_s=1.4,
            samples_per_s=11.4,
            single_device_s=4.8,
            data_parallel_s=None,
        ),
        baselines=(BaselineScore(name="uniform", minibatch_s=2.0, stages=2, fits=False, note="x"),),
    )
    defaults.update(kw)
    return Plan(**defaults)


def test_round_trip_and_file(tmp_path):
    plan = _plan()
    assert Plan.from_json(plan.to_json()) == plan
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan


def test_describe_marks_bottleneck_and_reports_speedups():
    text = _plan().describe()
    assert "1 *" in text
    assert "a .. c" in text
    assert "0-1" in text
    assert "speedup: 3.43x over one device, data parallelism does not fit in memory" in text
    assert "does not fit" in text


def test_check_profile_accepts_dag_order_not_contiguous():
    _plan().check_profile(_profile())  # stages {a, c} then {b, d}: a topological order


@pytest.mark.parametrize(
    ("stages", "needle"),
    [
        ((_stage(("a",), (0,)), _stage(("b", "c"), (1,))), "in no stage"),
        ((_stage(("a", "d"), (0,)), _stage(("b", "c"), (1,))), "later stage"),
        ((_stage(("a", "b", "c", "d", "z"), (0,)),), "lacks"),
    ],
)
def test_check_profile_rejects(stages, needle):
    with pytest.raises(PlanError, match=needle):
        _plan(stages=stages).check_profile(_profile())


def test_check_profile_rejects_other_file():
    with pytest.raises(PlanError, match="differs"):
        _plan().check_profile(_profile(), sha256="1" * 64)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"stages": (_stage(("a",), (0,)), _stage(("a", "b"), (1,)))}, "is in stage 0 and stage 1"),
        ({"stages": (_stage(("a",), (0,)), _stage(("b",), (0,)))}, "rank 0 runs both"),
        ({"stages": (_stage(("a",), (7,)),)}, "outside the topology"),
        ({"microbatches": 3}, "is not 3 microbatches"),
    ],
)
def test_structural_invariants(change, needle):
    with pytest.raises(PlanError, match=needle):
        _plan(**change)


def test_replicas_must_match_ranks():
    stage = dataclasses.replace(_stage(("a", "b", "c", "d"), (0, 1)), replicas=3)
    with pytest.raises(PlanError, match="3 replicas but 2 ranks"):
        _plan(stages=(stage,))


def test_bad_files(tmp_path):
    path = tmp_path / "plan.json"
    doc = _plan().to_dict()
    doc["format"] = "planner.plan/9"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=r"expected 'planner\.plan/1'"):
        Plan.load(path)
    doc["format"] = "planner.plan/1"
    doc["stages"][0]["replicas"] = 0
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanError, match="stages/0/replicas"):
        Plan.load(path)
    path.write_text(_plan().to_json()[:100])
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(path)
