"""Checkpoints: a run stopped after step k and resumed equals an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_helpers import make_plan, run_cases

from planner.runtime.checkpoint import latest_step, load_rank, resume_state
from planner.runtime.config import RunError

MLP = "runtime_models:mlp"
SCHEDULES = {  # name -> (plan arguments, momentum)
    "1f1b-momentum": (dict(cuts=["_3"], replicas=[2, 1], schedule="1f1b"), 0.9),
    "pipedream": (dict(cuts=["_2", "_5"], replicas=[1, 1, 1], schedule="pipedream"), 0.0),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = Path(tmp_path_factory.mktemp("ckpt"))
    cases, overrides = {}, {}
    for name, (kw, momentum) in SCHEDULES.items():
        plan = make_plan(MLP, **kw)
        every = dict(checkpoint_every=2, momentum=momentum)
        cases[f"{name}-full"] = plan
        overrides[f"{name}-full"] = dict(steps=5, checkpoint_dir=str(tmp / f"{name}-a"), **every)
        cases[f"{name}-stopped"] = plan
        overrides[f"{name}-stopped"] = dict(steps=2, checkpoint_dir=str(tmp / f"{name}-b"), **every)
        cases[f"{name}-resumed"] = plan
        overrides[f"{name}-resumed"] = dict(
            steps=5, checkpoint_dir=str(tmp / f"{name}-b"), resume=True, **every
        )
    return {"tmp": tmp, "results": run_cases(cases, tmp, overrides=overrides)}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_resumed_run_equals_uninterrupted_run(runs: dict, name: str) -> None:
    full, resumed = runs["results"][f"{name}-full"], runs["results"][f"{name}-resumed"]
    for rank, result in full.items():
        assert result["error"] is None and resumed[rank]["error"] is None, (result, resumed[rank])
        for key, value in result["state"].items():
            torch.testing.assert_close(resumed[rank]["state"][key], value, rtol=0, atol=0)
        if result["losses"]:
            assert len(result["losses"]) == 5 and len(resumed[rank]["losses"]) == 3
            torch.testing.assert_close(
                torch.tensor(resumed[rank]["losses"]),
                torch.tensor(result["losses"][2:]),
                rtol=0,
                atol=0,
                equal_nan=True,
            )
    assert latest_step(runs["tmp"] / f"{name}-b") == 4
    saved = load_rank(runs["tmp"] / f"{name}-b", step=4, rank=0)
    assert saved["step"] == 4 and saved["stage"] == 0 and "module" in saved and "rng" in saved


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no complete checkpoint"):
        resume_state(str(tmp_path), rank=0, stage=0, replica=0, plan="x", steps=3)
    (tmp_path / "latest").write_text("4\n")
    with pytest.raises(RunError, match="nothing to run"):
        resume_state(str(tmp_path), rank=0, stage=0, replica=0, plan="x", steps=4)
    with pytest.raises(RunError, match="missing"):
        resume_state(str(tmp_path), rank=0, stage=0, replica=0, plan="x", steps=6)
