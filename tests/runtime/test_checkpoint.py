"""Checkpoints: a run stopped after step k and resumed equals an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runtime_helpers import make_plan, run_cases

from planner.runtime.checkpoint import (
    Checkpointer,
    checkpoint_lock,
    latest_step,
    load_rank,
    resume_state,
    save_rank,
)
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


@pytest.mark.distributed
def test_pipedream_resume_restores_the_stash_version(runs: dict) -> None:
    for rank in range(3):
        full = load_rank(runs["tmp"] / "pipedream-a", step=4, rank=rank)
        resumed = load_rank(runs["tmp"] / "pipedream-b", step=4, rank=rank)
        assert full["stash_version"] > 0
        assert resumed["stash_version"] == full["stash_version"], rank


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no complete checkpoint"):
        resume_state(str(tmp_path), rank=0, stage=0, replica=0, plan="x", steps=3)
    (tmp_path / "latest").write_text("4\n")
    with pytest.raises(RunError, match="nothing to run"):
        resume_state(str(tmp_path), rank=0, stage=0, replica=0, plan="x", steps=4)
    with pytest.raises(RunError, match="missing"):
        resume_state(str(tmp_path), rank=0, stage=0, replica=0, plan="x", steps=6)


# --- the checkpoint folder's lock, its marker, and loading --------------------------------------


def test_a_second_run_on_a_folder_is_refused_and_the_lock_released(tmp_path: Path) -> None:
    with checkpoint_lock(tmp_path / "ckpt") as lock:
        assert f"pid {os.getpid()}" in lock.read_text()
        refused = pytest.raises(RunError, match=rf"in use by another run \(pid {os.getpid()} on")
        with refused, checkpoint_lock(tmp_path / "ckpt"):
            pass
    assert not (tmp_path / "ckpt" / "lock").exists()
    with checkpoint_lock(tmp_path / "ckpt"):  # free again
        pass


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from planner.runtime.checkpoint import checkpoint_lock\n"
            "with checkpoint_lock(sys.argv[1]):\n"
            "    print('locked', flush=True); time.sleep(600)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"pid {holder.pid}"), checkpoint_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert f"pid {holder.pid}" in (tmp_path / "lock").read_text()  # left behind by the kill
    with checkpoint_lock(tmp_path) as lock:
        assert f"pid {os.getpid()}" in lock.read_text()


@pytest.mark.parametrize("content", ["nan\n", "-1\n", "4.5\n", "", "1e3", "٣\n", "x" * 100])
def test_a_bad_marker_is_one_line(tmp_path: Path, content: str) -> None:
    (tmp_path / "latest").write_text(content)
    with pytest.raises(RunError, match="checkpoint marker") as info:
        latest_step(tmp_path)
    assert "\n" not in str(info.value)


def test_a_marker_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "latest").mkdir()
    with pytest.raises(RunError, match="is a folder"):
        latest_step(tmp_path)
    fifo = tmp_path / "other"
    fifo.mkdir()
    os.mkfifo(fifo / "latest")
    with pytest.raises(RunError, match="not a regular file"):
        latest_step(fifo)  # refused without blocking on the FIFO


def test_a_checkpoint_of_other_shapes_names_the_tensor(tmp_path: Path) -> None:
    source = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    target = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    state = {"module": source.state_dict(), "optimizer": None, "rng": torch.get_rng_state()}
    save_rank(tmp_path, step=2, rank=0, state=state)
    loaded = load_rank(tmp_path, step=2, rank=0)
    with pytest.raises(RunError) as info:
        Checkpointer.restore(loaded, module=target, optimizer=None)
    message = str(info.value)
    assert "'0.weight' has shape (4, 3) but the stage's has (5, 3)" in message
    assert "rank-0.pt" in message and "\n" not in message
    with pytest.raises(RunError, match=r"has no tensor '2\.weight'"):
        bigger = torch.nn.Sequential(*source, torch.nn.Linear(2, 2))
        Checkpointer.restore(loaded, module=bigger, optimizer=None)
    with pytest.raises(RunError, match=r"has tensor '1\.bias' that this stage lacks"):
        Checkpointer.restore(loaded, module=torch.nn.Sequential(source[0]), optimizer=None)


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_a_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    path = tmp_path / "step-000002" / "rank-0.pt"
    path.parent.mkdir()
    torch.save({"step": 2, "module": _Payload()}, path)
    with pytest.raises(
        RunError, match=r"cannot read checkpoint .*rank-0\.pt: UnpicklingError"
    ) as info:
        load_rank(tmp_path, step=2, rank=0)
    assert "\n" not in str(info.value)
