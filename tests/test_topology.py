import json

import pytest

from planner.errors import TopologyError
from planner.topology import PRESETS, Level, Topology, parse_bandwidth


def test_one_level_from_gpus():
    t = Topology.from_args(gpus=8)
    assert t.num_devices == 8
    assert len(t.levels) == 1
    assert t.link_level(0, 7) == 0
    assert t.link_level(3, 3) == -1


def test_two_levels_rank_layout():
    t = Topology.from_args(
        gpus=16, gpus_per_node=8, bandwidth_gbps=25, inter_node_bandwidth_gbps=10
    )
    assert [lv.devices for lv in t.levels] == [8, 2]
    assert t.link_level(0, 7) == 0
    assert t.link_level(7, 8) == 1
    assert t.span_level([8, 9, 15]) == 0
    assert t.span_level([0, 8]) == 1
    assert t.span_level([5]) == -1
    assert t.bandwidth(1) == 10e9
    assert t.transfer_s(10e9, 1) == pytest.approx(1.0)
    assert t.transfer_s(10e9, -1) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"gpus": 0}, "--gpus"),
        ({"gpus": 16, "gpus_per_node": 6}, "does not divide"),
        ({"gpus": 8, "bandwidth_gbps": 0}, "bandwidth must be positive"),
        ({"gpus": 8, "bandwidth_gbps": -3}, "bandwidth must be positive"),
        ({"gpus": 8, "memory_gb": 0}, "memory must be positive"),
    ],
)
def test_invalid_arguments_are_refused_with_the_reason(kwargs, needle):
    with pytest.raises(TopologyError, match=needle):
        Topology.from_args(**kwargs)


def test_level_rejects_zero_devices():
    with pytest.raises(TopologyError, match="at least 1 device"):
        Level(devices=0, bandwidth_bytes_per_s=1e9)


def test_presets_build_and_unknown_preset_lists_choices():
    for name in PRESETS:
        t = Topology.preset(name, nodes=2)
        assert t.num_devices == 2 * PRESETS[name]["gpus_per_node"]
        assert t.levels[1].bandwidth_bytes_per_s < t.levels[0].bandwidth_bytes_per_s
    with pytest.raises(TopologyError, match=r"p3\.16xlarge"):
        Topology.preset("dgx-9000")


def test_json_round_trip_and_bad_file(tmp_path):
    t = Topology.from_args(gpus=16, gpus_per_node=4, memory_gb=32)
    path = tmp_path / "topo.json"
    t.save(path)
    assert Topology.load(path) == t
    assert Topology.resolve(str(path)) == t
    path.write_text(json.dumps({"levels": [{"devices": 4}], "memory_bytes": 1}))
    with pytest.raises(TopologyError, match="bandwidth_bytes_per_s"):
        Topology.load(path)
    path.write_text("{")
    with pytest.raises(TopologyError, match="not valid JSON"):
        Topology.load(path)


@pytest.mark.parametrize(
    ("text", "value"),
    [("25", 25e9), ("25GB/s", 25e9), ("100Gbit/s", 12.5e9), ("100gbps", 12.5e9), ("800MB/s", 8e8)],
)
def test_parse_bandwidth(text, value):
    assert parse_bandwidth(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["fast", "0", "-1GB/s", "10 parsecs"])
def test_parse_bandwidth_rejects(text):
    with pytest.raises(TopologyError):
        parse_bandwidth(text)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"memory_bytes": "NaN"}, "memory_bytes is NaN; every number must be finite"),
        ({"memory_bytes": "0"}, "memory_bytes must be positive"),
        ({"memory_bytes": "-1e999"}, "memory_bytes is -1e999"),
        ({"levels": '[{"devices": true, "bandwidth_bytes_per_s": 1e9}]'}, "levels/0/devices"),
        ({"levels": '[{"devices": 2.5, "bandwidth_bytes_per_s": 1e9}]'}, "levels/0/devices"),
        ({"levels": '[{"devices": 2, "bandwidth_bytes_per_s": Infinity}]'}, "levels/0/bandwidth"),
        ({"levels": '[{"devices": 2, "bandwidth_bytes_per_s": 0}]'}, "bandwidth must be positive"),
        ({"levels": '[{"devices": 2, "bandwidth_bytes_per_s": 1, "latency_s": -1}]'}, "latency"),
        ({"levels": "[]"}, "at least one level"),
        ({"levels": '[{"devices": 1099511627776, "bandwidth_bytes_per_s": 1e9}]'}, "more than"),
        (
            {
                "levels": '[{"devices": 1024, "bandwidth_bytes_per_s": 1e9}, '
                '{"devices": 2048, "bandwidth_bytes_per_s": 1e9}]'
            },
            "has 2097152 devices, more than the 1048576",
        ),
    ],
)
def test_topology_file_values_are_checked_with_the_field(tmp_path, change, needle):
    doc = {"memory_bytes": "1e9", "levels": '[{"devices": 2, "bandwidth_bytes_per_s": 1e9}]'}
    doc.update(change)
    path = tmp_path / "t.json"
    path.write_text("{" + ", ".join(f'"{k}": {v}' for k, v in doc.items()) + "}")
    with pytest.raises(TopologyError, match=needle) as caught:
        Topology.load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_topology_file_name_is_printable(tmp_path):
    path = tmp_path / "t.json"
    doc = Topology.from_args(gpus=2).to_dict()
    doc["name"] = "rack\x1b[2J\n7"
    path.write_text(json.dumps(doc))
    topology = Topology.load(path)
    assert topology.name == "rack?[2J?7"
    assert "\x1b" not in topology.describe()


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "folder"])
def test_topology_file_must_be_a_regular_file(tmp_path, special):
    import os

    path = {"/dev/zero": "/dev/zero", "fifo": tmp_path / "f", "folder": tmp_path}[special]
    if special == "fifo":
        os.mkfifo(path)
    with pytest.raises(TopologyError, match=r"not a regular file|is a folder"):
        Topology.load(path)


def test_loopback_links_replace_the_innermost_level_and_add_process_memory():
    from planner.topology import CPU_LOOPBACK, with_loopback_links

    t = with_loopback_links(
        Topology.from_args(gpus=8, gpus_per_node=4, inter_node_bandwidth_gbps=2, memory_gb=8)
    )
    assert t.name == "cpu-loopback" and t.num_devices == 8
    inner, outer = t.levels
    assert (inner.devices, inner.bandwidth_bytes_per_s, inner.latency_s) == (
        4,
        CPU_LOOPBACK.bandwidth_bytes_per_s,
        CPU_LOOPBACK.latency_s,
    )
    assert (outer.devices, outer.bandwidth_bytes_per_s, outer.latency_s) == (2, 2e9, 0.0)
    assert t.memory_bytes == 8 * 1024**3 and t.process_bytes == CPU_LOOPBACK.process_bytes
    # a message pays the latency: 1 kB over loopback costs the latency and a little
    assert t.transfer_s(1000, 0) == pytest.approx(
        CPU_LOOPBACK.latency_s + 1000 / CPU_LOOPBACK.bandwidth_bytes_per_s
    )
    assert "us" in t.describe() and "per process" in t.describe()
    assert Topology.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    # the measured numbers come with their source
    assert "benchmarks/loopback_links.py" in CPU_LOOPBACK.source
    assert 0 < CPU_LOOPBACK.latency_s < 0.1 and CPU_LOOPBACK.bandwidth_bytes_per_s > 1e8


def test_process_memory_is_checked_and_written_only_when_set():
    plain = Topology.from_args(gpus=2)
    assert plain.process_bytes == 0.0 and "process_bytes" not in plain.to_dict()
    with pytest.raises(TopologyError, match="zero or positive"):
        Topology(levels=plain.levels, memory_bytes=2**30, process_bytes=-1.0)
    with pytest.raises(TopologyError, match="must exceed what each process holds"):
        Topology(levels=plain.levels, memory_bytes=2**30, process_bytes=2.0**30)
    doc = plain.to_dict() | {"process_bytes": "lots"}
    with pytest.raises(TopologyError):
        Topology.from_dict(doc)


def _cpu_profile(tmp_path):
    path = tmp_path / "p.json"
    _cpu_profile_object().save(path)
    return path


def _cpu_profile_object():
    from planner.profile.format import LayerProfile, Profile

    layers = tuple(
        LayerProfile(
            name=f"l{i}",
            op="Linear",
            forward_ms=1.0,
            backward_ms=2.0,
            output_bytes=(4096,),
            parameter_bytes=4096,
            inputs=(i - 1,) if i else (),
        )
        for i in range(4)
    )
    return Profile(model="m", batch_size=4, layers=layers, device="cpu")


def test_plan_from_a_cpu_profile_gets_loopback_links_unless_links_are_given(tmp_path, capsys):
    """``plan`` (planner/commands/plan.py) picks the cpu-loopback links for a CPU profile and says
    so in the summary's first line; --bandwidth or --topology keep the user's links."""
    from planner.cli import main
    from planner.plan import Plan

    profile = _cpu_profile(tmp_path)
    out = tmp_path / "plan.json"
    assert main(["--profile", str(profile), "--gpus", "2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("links: cpu-loopback preset (gloo on loopback")
    assert "pass --bandwidth or --topology for GPUs" in text.splitlines()[0]
    plan = Plan.load(out)
    assert plan.topology.name == "cpu-loopback" and plan.topology.levels[0].latency_s > 0
    # --json: stdout is the plan alone, which names its links
    assert main(["--profile", str(profile), "--gpus", "2", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["topology"]["name"] == "cpu-loopback"
    assert (
        main(["--profile", str(profile), "--gpus", "2", "--bandwidth", "25", "-o", str(out)]) == 0
    )
    assert "cpu-loopback" not in capsys.readouterr().out
    given = Plan.load(out).topology
    assert given.levels[0].bandwidth_bytes_per_s == 25e9 and given.levels[0].latency_s == 0.0
    assert given.process_bytes == 0.0
    assert main(["--profile", str(profile), "--topology", "p3.16xlarge", "-o", str(out)]) == 0
    assert Plan.load(out).topology.name == "p3.16xlarge"
    # the preset by name, for any profile; its links are measured, so --bandwidth is refused
    args = ["--profile", str(profile), "--topology", "cpu-loopback", "--gpus", "4", "-o", str(out)]
    assert main([*args, "--memory-gb", "2"]) == 0
    chosen = Plan.load(out).topology
    assert (chosen.name, chosen.num_devices, chosen.memory_bytes) == ("cpu-loopback", 4, 2 * 2**30)
    assert chosen.process_bytes > 0
    capsys.readouterr()
    assert main([*args, "--bandwidth", "10"]) == 2
    assert "--bandwidth does not combine with --topology cpu-loopback" in capsys.readouterr().err


def test_plans_count_each_process_memory_in_every_stage(tmp_path):
    """``Topology.process_bytes`` is in every stage's planned memory and leaves that much less
    for the stage's tensors (planner/optimize/cost.py, planner/planning.py)."""
    import dataclasses

    from planner.errors import InfeasibleError
    from planner.planning import PlanOptions, make_plan
    from planner.profile.format import Profile

    path = _cpu_profile(tmp_path)
    profile = Profile.load(path)
    base = Topology.from_args(gpus=2, memory_gb=1)
    options = PlanOptions(straight=True, microbatches=2)
    plain = make_plan(profile, path, base, options)
    tensors = [s.memory_bytes for s in plain.stages]
    process = max(tensors) / 2
    with_process = make_plan(
        profile, path, dataclasses.replace(base, process_bytes=process), options
    )
    assert [s.layers for s in with_process.stages] == [s.layers for s in plain.stages]
    assert [s.memory_bytes for s in with_process.stages] == pytest.approx(
        [t + process for t in tensors]
    )
    # a device whose memory holds the biggest stage's tensors but not them and the process too
    tight = max(tensors) + process / 2
    fits = dataclasses.replace(base, memory_bytes=tight)
    assert make_plan(profile, path, fits, options).stages
    with pytest.raises(InfeasibleError):
        make_plan(profile, path, dataclasses.replace(fits, process_bytes=process), options)


def test_op_overhead_is_checked_and_written_only_when_set():
    """``Topology.op_overhead_s``: the runtime's seconds per operation; 0 by default (GPU presets,
    user links), measured for cpu-loopback, round-tripped, refused when negative or not finite."""
    from planner.topology import CPU_LOOPBACK, with_loopback_links

    plain = Topology.from_args(gpus=2)
    assert plain.op_overhead_s == 0.0 and "op_overhead_s" not in plain.to_dict()
    assert "per operation" not in plain.describe()
    for name in PRESETS:
        assert Topology.preset(name).op_overhead_s == 0.0
    for bad in (-1e-6, float("nan"), float("inf")):
        with pytest.raises(TopologyError, match="overhead per operation"):
            Topology(levels=plain.levels, memory_bytes=2**30, op_overhead_s=bad)
    with pytest.raises(TopologyError):
        Topology.from_dict(plain.to_dict() | {"op_overhead_s": "slow"})
    with pytest.raises(TopologyError, match="overhead per operation"):
        Topology.from_dict(plain.to_dict() | {"op_overhead_s": -0.5})
    # the preset's number is measured, with its source, and carried by the topology
    loop = with_loopback_links(plain)
    assert loop.op_overhead_s == CPU_LOOPBACK.op_overhead_s
    assert 1e-6 < CPU_LOOPBACK.op_overhead_s < 0.01
    assert "benchmarks/runtime_overhead.py" in CPU_LOOPBACK.op_overhead_source
    assert "us of runtime per operation" in loop.describe()
    doc = json.loads(json.dumps(loop.to_dict()))
    assert doc["op_overhead_s"] == CPU_LOOPBACK.op_overhead_s
    assert Topology.from_dict(doc) == loop
    # an older file without the field reads as no overhead
    del doc["op_overhead_s"]
    assert Topology.from_dict(doc).op_overhead_s == 0.0


def test_a_plan_keeps_its_topologys_op_overhead(tmp_path):
    """The overhead travels in the plan (schema-checked) and old plans without it still load."""
    import dataclasses

    from planner.cli import main
    from planner.plan import Plan

    profile = _cpu_profile(tmp_path)
    out = tmp_path / "plan.json"
    assert main(["--profile", str(profile), "--gpus", "2", "-o", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.topology.op_overhead_s > 0
    assert Plan.from_json(plan.to_json()) == plan
    doc = json.loads(out.read_text())
    del doc["topology"]["op_overhead_s"]
    old = Plan.from_json(json.dumps(doc))
    assert old.topology == dataclasses.replace(plan.topology, op_overhead_s=0.0)


def test_allreduce_links_default_to_the_point_to_point_ones_and_round_trip():
    """``Level.allreduce_*``: None means the links' numbers; set, they are what every all-reduce
    (cost model, DP, bounds, ILP, simulator) charges, and they travel in JSON."""
    from planner.optimize.cost import CostModel
    from planner.optimize.formulas import allreduce_s
    from planner.topology import CPU_LOOPBACK, Level, with_loopback_links

    plain = Level(devices=4, bandwidth_bytes_per_s=2e9, latency_s=1e-5)
    assert (plain.ring_bandwidth_bytes_per_s, plain.ring_latency_s) == (2e9, 1e-5)
    assert "allreduce_latency_s" not in plain.to_dict()
    slow = Level(
        devices=4,
        bandwidth_bytes_per_s=2e9,
        latency_s=1e-5,
        allreduce_bandwidth_bytes_per_s=5e8,
        allreduce_latency_s=2e-4,
    )
    topo = Topology(levels=(slow,), memory_bytes=2**34)
    assert Topology.from_dict(json.loads(json.dumps(topo.to_dict()))) == topo
    for bad in ({"allreduce_bandwidth_bytes_per_s": 0.0}, {"allreduce_latency_s": -1.0}):
        with pytest.raises(TopologyError, match="all-reduce"):
            Level(devices=2, bandwidth_bytes_per_s=1e9, **bad)
    with pytest.raises(TopologyError):
        Topology.from_dict(
            topo.to_dict() | {"levels": [slow.to_dict() | {"allreduce_latency_s": "fast"}]}
        )
    profile = _cpu_profile_object()
    cost = CostModel(profile, topo)
    assert cost.allreduce_level_s(1e6, 4, 0) == pytest.approx(allreduce_s(1e6, 4, 5e8, 2e-4))
    loop = with_loopback_links(Topology.from_args(gpus=2))
    assert loop.levels[0].ring_latency_s == CPU_LOOPBACK.allreduce_latency_s
    assert loop.levels[0].ring_bandwidth_bytes_per_s == CPU_LOOPBACK.allreduce_bandwidth_bytes_per_s
    assert "loopback_links.py" in CPU_LOOPBACK.allreduce_source


def test_update_cost_per_byte_is_checked_and_round_trips():
    from planner.topology import CPU_LOOPBACK, with_loopback_links

    plain = Topology.from_args(gpus=2)
    assert plain.update_s("adam", 1e9) == 0.0 and "update_s_per_byte" not in plain.to_dict()
    loop = with_loopback_links(plain)
    costs = dict(CPU_LOOPBACK.update_s_per_byte)
    assert set(costs) == {"sgd", "momentum", "adam"}
    assert costs["sgd"] < costs["momentum"] < costs["adam"]  # state buffers cost passes
    assert loop.update_s("adam", 1e6) == pytest.approx(costs["adam"] * 1e6)
    doc = json.loads(json.dumps(loop.to_dict()))
    assert doc["update_s_per_byte"] == costs
    assert Topology.from_dict(doc) == loop
    for bad in (-1e-9, float("nan")):
        with pytest.raises(TopologyError, match="seconds per byte"):
            Topology(levels=plain.levels, memory_bytes=2**30, update_s_per_byte=(("sgd", bad),))
    with pytest.raises(TopologyError):
        Topology.from_dict(plain.to_dict() | {"update_s_per_byte": ["sgd"]})
