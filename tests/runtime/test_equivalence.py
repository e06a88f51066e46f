"""Training with a plan on several gloo ranks gives single-process training's parameters.

All cases run on one set of spawned processes (process start-up dominates otherwise); each case
is then checked on its own. Covers an MLP, a CNN with skip connections cut inside a residual
block (a skip relayed over a stage, a shape value crossing a cut), gpt2-tiny (a tuple crossing a
cut) and a GPT with tied input/output embeddings, under gpipe and 1f1b, with uniform and
non-uniform replication, recomputation and pure data parallelism.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_helpers import assert_matches_reference, make_plan, reference, run_cases

pytestmark = pytest.mark.distributed

MLP, CNN, GPT, TIED = (
    "runtime_models:mlp",
    "runtime_models:cnn",
    "gpt2-tiny",
    "runtime_models:gpt_tied",
)

CASES = {
    "mlp-1f1b": (MLP, dict(cuts=["_3"], replicas=[1, 1], schedule="1f1b")),
    "mlp-gpipe-4-stages": (
        MLP,
        dict(cuts=["_2", "_4", "_6"], replicas=[1, 1, 1, 1], schedule="gpipe"),
    ),
    "mlp-gpipe-3-to-1": (MLP, dict(cuts=["_3"], replicas=[3, 1], schedule="gpipe")),
    "mlp-1f1b-recompute": (MLP, dict(cuts=["_3"], replicas=[1, 1], recompute=True)),
    "mlp-data-parallel": (MLP, dict(cuts=[], replicas=[2], microbatches=3)),
    "cnn-1f1b-relay": (CNN, dict(cuts=["relu_1", "block1_conv2", "view"], replicas=[1, 1, 1, 1])),
    "cnn-gpipe-1-to-2": (
        CNN,
        dict(cuts=["block1_conv2"], replicas=[1, 2], schedule="gpipe", microbatches=5),
    ),
    "cnn-1f1b-2-1-1": (
        CNN,
        dict(cuts=["block1_conv2", "view"], replicas=[2, 1, 1], microbatches=3),
    ),
    "gpt-1f1b-tuple-cut": (GPT, dict(cuts=["getitem"], replicas=[1, 1], microbatches=2)),
    "gpt-gpipe-2x2": (
        GPT,
        dict(cuts=["blocks_1_ln1"], replicas=[2, 2], schedule="gpipe", microbatch_size=1),
    ),
    "gpt-tied-1f1b-1-1-2": (TIED, dict(cuts=["add_1", "blocks_1_ln1"], replicas=[1, 1, 2])),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    plans = {name: make_plan(model, **kw) for name, (model, kw) in CASES.items()}
    return {"plans": plans, "results": run_cases(plans, Path(tmp_path_factory.mktemp("eq")))}


@pytest.mark.parametrize("case", list(CASES))
def test_same_parameters_as_single_process(trained: dict, case: str) -> None:
    model = CASES[case][0]
    plan = trained["plans"][case]
    expected, losses = reference(model, plan)
    assert_matches_reference(model, trained["results"][case], expected, losses)
