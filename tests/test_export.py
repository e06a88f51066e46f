"""Tests of planner.export and planner.export_torch: exports that other systems load as they are.

torch.distributed.pipelining: ``pipeline()`` on the export must give the plan's stage count and
each stage exactly the parameters of the plan's layers, for every shipped model.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from planner.errors import PlanError
from planner.export import ExportFormat, export_plan
from planner.models import load_model
from planner.plan import Plan
from planner.planning import PlanOptions, make_plan, shipped_profile
from planner.profile.capture import capture
from planner.profile.format import Profile
from planner.schedule_export import TORCH_SCHEDULE_CLASSES
from planner.schedules import Schedule
from planner.topology import Topology

pipelining = pytest.importorskip("torch.distributed.pipelining")

RUNTIME_TESTS = Path(__file__).resolve().parent / "runtime"


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _policy(source: str, tmp_path: Path, name: str = "policy"):
    """Import the exported companion .py as the user would."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.split_policy


def _expected_parameters(
    plan: Plan, module: torch.nn.Module, fqns=None, leaf_modules=()
) -> list[set[str]]:
    """Each stage's parameter names in the user's model, from the plan's layers."""
    graph = capture(module, leaf_modules)
    layers = {layer.name: layer for layer in graph.layers}
    fqns = fqns or {}
    stages = []
    for stage in plan.stages:
        names: set[str] = set()
        for name in stage.layers:
            node = layers[name].node
            if node.op != "call_module":
                continue
            target = str(node.target)
            sub = module.get_submodule(target)
            prefix = fqns.get(target, target)
            for pname, _ in sub.named_parameters():
                # Hugging Face layers hold their parameters under model.<original path>
                pname = pname.removeprefix("model.").removeprefix(prefix + ".")
                names.add(f"{prefix}.{pname}")
        stages.append(names)
    return stages


def _stage_parameters(pipe) -> list[set[str]]:
    return [
        {name for name, _ in pipe.get_stage_module(i).named_parameters()}
        for i in range(pipe.num_stages)
    ]


def _shipped_plan(model: str, gpus: int) -> tuple[Plan, Profile]:
    path = shipped_profile(model)
    assert path is not None, f"no shipped profile for {model}"
    profile = Profile.load(path)
    plan = make_plan(profile, path, Topology.from_args(gpus=gpus), PlanOptions(straight=True))
    return plan, profile


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "gpus", "input_shape"),
    [("resnet50", 8, (3, 64, 64)), ("vgg16", 4, (3, 32, 32)), ("gpt2-small", 4, (16,))],
)
def test_split_policy_gives_the_plans_stages_for_shipped_models(model, gpus, input_shape, tmp_path):
    plan, profile = _shipped_plan(model, gpus)
    assert len(plan.stages) == gpus
    spec = load_model(
        model, batch_size=plan.microbatch_size, input_shape=profile.input_shape or None
    )
    exported = export_plan(plan, profile, ExportFormat.TORCH_PIPELINING, model=spec)
    doc = json.loads(exported.text)
    assert doc["num_stages"] == gpus
    if model == "gpt2-small":  # whole blocks per stage: a torchtitan fragment
        parts = doc["torchtitan"]["parallelism"]["module_fqns_per_model_part"]
        assert len(parts) == gpus
        blocks = [fqn for part in parts for fqn in part if fqn.startswith("blocks.")]
        assert blocks == [f"blocks.{i}" for i in range(12)]
    # pipeline() on a small input: the policy names module calls, not shapes.
    small = load_model(model, batch_size=2, input_shape=input_shape)
    (x,), _ = small.make_batch(2, 0)
    policy = _policy(exported.companions[".py"], tmp_path)
    pipe = pipelining.pipeline(small.module, mb_args=(x,), split_policy=policy)
    assert pipe.num_stages == len(plan.stages)  # 8 for ResNet-50, not 14
    expected = _expected_parameters(plan, small.module, leaf_modules=profile.leaf_modules)
    assert _stage_parameters(pipe) == expected


def test_resnet_split_spec_is_refused_where_modules_repeat(tmp_path):
    """A ResNet plan boundary at a repeated ReLU: no split_spec, and the note says why."""
    sys.path.insert(0, str(RUNTIME_TESTS))
    from runtime_helpers import make_plan as plan_with_cuts
    from runtime_helpers import with_profile

    plan = with_profile(
        plan_with_cuts("resnet18", cuts=["layer2_0_relu_1"], replicas=[1, 1]), tmp_path
    )
    profile = Profile.load(tmp_path / "profile.json")
    spec = load_model("resnet18", batch_size=2)
    exported = export_plan(plan, profile, ExportFormat.TORCH_PIPELINING, model=spec)
    doc = json.loads(exported.text)
    assert doc["split_spec"] is None
    assert any("called more than once" in note for note in doc["notes"])
    small = load_model("resnet18", batch_size=2, input_shape=(3, 32, 32))
    (x,), _ = small.make_batch(2, 0)
    pipe = pipelining.pipeline(
        small.module, mb_args=(x,), split_policy=_policy(exported.companions[".py"], tmp_path)
    )
    assert pipe.num_stages == 2
    assert _stage_parameters(pipe) == _expected_parameters(plan, small.module)


def test_hf_model_gets_split_spec_policy_and_torchtitan_parts(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(RUNTIME_TESTS))
    from runtime_helpers import make_plan as plan_with_cuts
    from runtime_helpers import with_profile

    from planner.models.hf import _build, _config, with_model_config
    from planner.profile.export_capture import layer_fqns

    overrides = {"n_layer": 3, "n_embd": 32, "n_head": 2, "vocab_size": 128, "n_positions": 32}
    ref = with_model_config("hf:gpt2", json.dumps(overrides))
    plan = plan_with_cuts(ref, cuts=["transformer_h_1", "transformer_h_2"], replicas=[1, 1, 1])
    plan = with_profile(plan, tmp_path)
    profile = Profile.load(tmp_path / "profile.json")
    spec = load_model(ref, batch_size=2, input_shape=(16,))
    exported = export_plan(plan, profile, ExportFormat.TORCH_PIPELINING, model=spec)
    doc = json.loads(exported.text)
    assert doc["split_spec"] == {"transformer.h.1": "BEGINNING", "transformer.h.2": "BEGINNING"}
    assert doc["mb_kwargs"] == {"use_cache": False}
    parts = doc["torchtitan"]["parallelism"]["module_fqns_per_model_part"]
    assert parts[1] == ["transformer.h.1"]
    assert parts[0][-1] == "transformer.h.0" and parts[2][0] == "transformer.h.2"
    assert parts[2][-1] == "lm_head"
    expected = _expected_parameters(plan, spec.module, layer_fqns(spec.module))
    ids = torch.randint(128, (2, 16))
    for how in ("split_spec", "split_policy"):
        torch.manual_seed(0)
        hf_model, _ = _build(_config("gpt2", overrides))
        if how == "split_spec":
            split = {k: pipelining.SplitPoint[v] for k, v in doc["split_spec"].items()}
            pipe = pipelining.pipeline(
                hf_model, mb_args=(ids,), mb_kwargs=doc["mb_kwargs"], split_spec=split
            )
        else:
            policy = _policy(exported.companions[".py"], tmp_path, name="hf_policy")
            pipe = pipelining.pipeline(
                hf_model, mb_args=(ids,), mb_kwargs=doc["mb_kwargs"], split_policy=policy
            )
        assert pipe.num_stages == 3, how
        assert _stage_parameters(pipe) == expected, how


def test_export_of_a_pipedream_profile_names_the_command_that_profiles_the_model(
    tmp_path, shared_dir
):
    from planner.profile.pipedream import read_graph_txt

    profile = read_graph_txt(shared_dir / "vgg16" / "graph.txt")
    profile.save(tmp_path / "vgg-pd.profile.json")
    plan = make_plan(
        profile, tmp_path / "vgg-pd.profile.json", Topology.from_args(gpus=4), PlanOptions()
    )
    with pytest.raises(PlanError, match=r"imported from PipeDream and has no model") as info:
        export_plan(plan, profile, ExportFormat.TORCH_PIPELINING)
    assert "plan profile --model vgg16 --batch-size 128" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule", [Schedule.INTERLEAVED_1F1B, Schedule.ZB_H1, Schedule.ZBV], ids=str
)
def test_rank_schedule_exports_torchs_class_layout_and_a_csv_torch_loads(schedule, tmp_path):
    from test_schedule_export import torch_runtime_loads

    path = shipped_profile("gpt2-small")
    assert path is not None
    profile = Profile.load(path)
    plan = make_plan(
        profile,
        path,
        Topology.from_args(gpus=4),
        PlanOptions(schedule=schedule, minibatch_size=8, microbatches=8),
    )
    spec = load_model("gpt2-small", batch_size=plan.microbatch_size)
    exported = export_plan(plan, profile, ExportFormat.TORCH_PIPELINING, model=spec)
    doc = json.loads(exported.text)
    ranks = len(plan.stages) // plan.chunks
    assert doc["schedule"] == TORCH_SCHEDULE_CLASSES[schedule]  # not Schedule1F1B
    assert doc["pipeline_ranks"] == ranks
    assert [(r,) for r in doc["stage_to_rank"]] == [stage.ranks for stage in plan.stages]
    assert sorted(s for stages in doc["stages_of_rank"] for s in stages) == list(
        range(len(plan.stages))
    )
    parts = doc["torchtitan"]["parallelism"]
    assert parts["pipeline_parallel_degree"] == ranks
    assert parts["pipeline_parallel_schedule"] == doc["schedule"].removeprefix("Schedule")
    assert len(parts["module_fqns_per_model_part"]) == len(plan.stages)
    csv = tmp_path / "schedule.csv"
    csv.write_text(exported.companions[".csv"])
    runtime = torch_runtime_loads(csv, ranks, len(plan.stages), plan.microbatches)
    assert runtime.stage_index_to_group_rank == dict(enumerate(doc["stage_to_rank"]))


def test_a_1f1b_export_names_schedule1f1b_and_its_csv(tmp_path):
    from test_schedule_export import torch_runtime_loads

    from planner.export import _torch_schedule

    path = shipped_profile("gpt2-small")
    assert path is not None
    plan = make_plan(
        Profile.load(path), path, Topology.from_args(gpus=4), PlanOptions(straight=True)
    )
    notes: list[str] = []
    doc, text = _torch_schedule(plan, notes)
    assert doc["schedule"] == "Schedule1F1B" and doc["stage_to_rank"] == [0, 1, 2, 3]
    csv = tmp_path / "schedule.csv"
    csv.write_text(text)
    torch_runtime_loads(csv, 4, 4, plan.microbatches)


# --- DeepSpeed -----------------------------------------------------------------------------------


def _deepspeed_rank(rank: int, companion: str, port: int, out: str) -> None:
    """One rank: build the exported PipelineModule, train 2 steps, save the losses."""
    import os

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed would JIT-compile a shared-memory collective with ninja on CPU; gloo suffices.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    dist.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    spec = importlib.util.spec_from_file_location("ds_export", companion)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.pipeline_module()
    engine, _, _, _ = deepspeed.initialize(
        model=net, model_parameters=[p for p in net.parameters()], config=module.DS_CONFIG
    )
    from planner.runtime.data import microbatch, minibatch_seed
    from planner.runtime.worker import load_spec

    plan = Plan.load(module.PLAN)
    model = load_spec(plan)
    losses = []
    for step in range(2):
        batch = model.make_batch(plan.minibatch_size, minibatch_seed(0, step))
        micro = [microbatch(batch, m, size=plan.microbatch_size) for m in range(plan.microbatches)]
        data = iter([(inputs[0], targets) for inputs, targets in micro])
        losses.append(float(engine.train_batch(data_iter=data)))
    torch.save({"losses": losses, "stage": engine.stage_id}, f"{out}/ds{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_builds_and_trains_the_export_with_the_plans_partition(tmp_path):
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    sys.path.insert(0, str(RUNTIME_TESTS))
    from runtime_helpers import free_port, reference, with_profile
    from runtime_helpers import make_plan as plan_with_cuts

    plan = with_profile(
        plan_with_cuts("gpt2-tiny", cuts=["blocks_1_ln1"], replicas=[1, 1], microbatches=2),
        tmp_path,
    )
    profile = Profile.load(tmp_path / "profile.json")
    spec = load_model("gpt2-tiny", batch_size=2)
    exported = export_plan(
        plan,
        profile,
        ExportFormat.DEEPSPEED,
        model=spec,
        plan_path=str(tmp_path / "plan.json"),
    )
    doc = json.loads(exported.text)
    assert doc["partition_method"] == "type:PlannedStage" and doc["num_stages"] == 2
    assert [entry["stage_layers"] for entry in doc["layers"]] == [
        list(s.layers) for s in plan.stages
    ]
    companion = tmp_path / "ds_export.py"
    companion.write_text(exported.companions[".py"])
    mp.spawn(
        _deepspeed_rank, args=(str(companion), free_port(), str(tmp_path)), nprocs=2, join=True
    )
    results = [torch.load(tmp_path / f"ds{r}.pt") for r in range(2)]
    assert [r["stage"] for r in results] == [0, 1]
    # DeepSpeed's losses are single-process training's (SGD, lr 0.01, mean over microbatches):
    # the first exactly, the second after DeepSpeed's own update (its reductions round apart).
    _, expected = reference("gpt2-tiny", plan, steps=2, lr=0.01)
    got = torch.tensor(results[1]["losses"])
    torch.testing.assert_close(got[:1], torch.tensor(expected[:1]))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-4, atol=1e-6)


def test_running_a_pipedream_plan_names_the_command_that_profiles_the_model(tmp_path, shared_dir):
    from planner.profile.pipedream import read_graph_txt
    from planner.runtime.stage import capture_for_plan

    profile = read_graph_txt(shared_dir / "vgg16" / "graph.txt")
    profile.save(tmp_path / "vgg-pd.profile.json")
    plan = make_plan(
        profile, tmp_path / "vgg-pd.profile.json", Topology.from_args(gpus=4), PlanOptions()
    )
    spec = load_model("vgg16", batch_size=1, input_shape=(3, 32, 32))
    with pytest.raises(PlanError, match=r"imported from PipeDream") as info:
        capture_for_plan(plan, spec.module)
    assert "plan profile --model vgg16 --batch-size 128 -o vgg16.json" in str(info.value)
    assert "changed since profiling" not in str(info.value)
