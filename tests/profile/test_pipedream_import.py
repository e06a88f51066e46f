"""PipeDream graph.txt import, export and preprocessing."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest

from planner.errors import ProfileError
from planner.profile import LayerProfile, Profile
from planner.profile.pipedream import (
    infer_batch_size,
    pipedream_preprocess,
    read_graph_txt,
    write_graph_txt,
)

MODELS = ("alexnet", "gnmt", "resnet18", "resnet50", "vgg16")
# From the shared README (conv1's activation size); GNMT has no image input, so the test passes one.
BATCH = {"alexnet": 256, "resnet18": 256, "resnet50": 128, "vgg16": 128}
GNMT_BATCH = 64


def _read(shared: Path, model: str) -> Profile:
    path = shared / model / "graph.txt"
    return read_graph_txt(path, batch_size=GNMT_BATCH if model == "gnmt" else None)


def _semantic(text: str) -> tuple[dict[str, tuple[str, tuple[float, ...]]], list[tuple[str, str]]]:
    """Nodes (desc, numbers) and edges of a graph.txt text, independent of number formatting."""
    nodes, edges = {}, []
    for line in text.strip("\n").split("\n"):
        if line.startswith("\t"):
            a, b = line.strip().split(" -- ")
            edges.append((a, b))
            continue
        name, desc, meta = line.split(" -- ")
        numbers = tuple(
            float(x)
            for item in meta.split(", ")
            for x in item.split("=")[1].strip("[]").split("; ")
        )
        nodes[name] = (desc, numbers)
    return nodes, sorted(edges)


@pytest.mark.parametrize("model", MODELS)
def test_shared_profiles_import_and_round_trip(
    shared_dir: Path, model: str, tmp_path: Path
) -> None:
    profile = _read(shared_dir, model)
    assert profile.model == model
    assert profile.source == "pipedream"
    assert profile.device == "V100 (PipeDream)"
    assert profile.batch_size == BATCH.get(model, GNMT_BATCH)
    # Topological, deterministic: layer 0 is node1 and inputs precede their readers.
    graph = profile.to_networkx()
    assert nx.is_directed_acyclic_graph(graph)
    assert all(s < i for i, layer in enumerate(profile.layers) for s in layer.inputs)
    out = tmp_path / "graph.txt"
    write_graph_txt(profile, out)
    again = read_graph_txt(out, batch_size=profile.batch_size, model=model)
    assert again == profile
    # The exported file says exactly what the original says (formatting aside).
    original = (shared_dir / model / "graph.txt").read_text()
    assert _semantic(out.read_text()) == _semantic(original)
    # And the profile JSON round-trips too.
    assert Profile.from_json(profile.to_json()) == profile


def test_vgg16_values(shared_dir: Path) -> None:
    profile = _read(shared_dir, "vgg16")
    assert len(profile) == 41
    assert profile.input_shape == (3, 224, 224)
    conv = profile.layers[profile.index("node12")]
    assert conv.op.startswith("Conv2d(128, 256")
    assert (conv.forward_ms, conv.backward_ms) == (10.814, 18.335)
    assert conv.output_bytes == (411041792,)
    assert conv.parameter_bytes == 1180672
    inp = profile.layers[0]
    assert (inp.name, inp.op, inp.forward_ms) == ("node1", "Input", 17.972)


def test_gnmt_multi_output_and_batch_required(shared_dir: Path) -> None:
    path = shared_dir / "gnmt" / "graph.txt"
    with pytest.raises(ProfileError, match="batch_size="):
        read_graph_txt(path)
    profile = read_graph_txt(path, batch_size=GNMT_BATCH)
    lstm = profile.layers[profile.index("node7")]
    assert lstm.output_bytes == (6291456, 131072, 131072)
    assert lstm.activation_bytes == 6291456 + 2 * 131072
    attention = profile.layers[profile.index("node23")]
    assert len(attention.output_bytes) == 5
    assert profile.input_shape == ()


def test_conflicting_batch_size_is_refused(shared_dir: Path) -> None:
    with pytest.raises(ProfileError, match="say batch size 128"):
        read_graph_txt(shared_dir / "resnet50" / "graph.txt", batch_size=64)
    assert read_graph_txt(shared_dir / "resnet50" / "graph.txt", batch_size=128).batch_size == 128


def test_preprocess_matches_pipedream_optimizer(shared_dir: Path) -> None:
    gnmt = pipedream_preprocess(_read(shared_dir, "gnmt"))
    names = {layer.name for layer in gnmt.layers}
    # Input0..2 removed; the unused __getitem__ sinks too; used __getitem__s and 'hidden' stay.
    assert not names & {"node1", "node2", "node3"}
    assert not names & {
        "node9",
        "node13",
        "node18",
        "node25",
        "node27",
        "node33",
        "node39",
        "node46",
    }
    assert {"node8", "node20", "node22", "node24"} <= names
    assert len(gnmt) == 48 - 3 - 8
    # Edges into kept layers survive with renumbered indices.
    node23 = gnmt.layers[gnmt.index("node23")]
    assert sorted(gnmt.layers[i].name for i in node23.inputs) == ["node19", "node21", "node22"]
    resnet = _read(shared_dir, "resnet50")
    pre = pipedream_preprocess(resnet)
    assert len(pre) == len(resnet) - 1
    assert pre.total_compute_ms == pytest.approx(resnet.total_compute_ms - 18.962)
    assert pre.graph_hash != resnet.graph_hash


# --- bad input ------------------------------------------------------------------------------

GOOD = (
    "node1 -- Input -- forward_compute_time=1.000, backward_compute_time=0.000, "
    "activation_size=1204224.000, parameter_size=0.000\n"
    "node2 -- Linear(in_features=150528, out_features=10, bias=True) -- forward_compute_time=1.5, "
    "backward_compute_time=2.0, activation_size=80.0, parameter_size=6021160.000\n"
    "node3 -- ReLU -- forward_compute_time=0.1, backward_compute_time=0.1, "
    "activation_size=[40.0; 40.0], parameter_size=0.0\n"
    "\tnode1 -- node2\n"
    "\tnode2 -- node3\n"
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "graph.txt"
    path.write_text(text)
    return path


def test_small_graph_reads(tmp_path: Path) -> None:
    profile = read_graph_txt(_write(tmp_path, GOOD), model="tiny")
    assert profile.batch_size == 2
    assert profile.input_shape == (3, 224, 224)
    assert profile.layers[2].output_bytes == (40, 40)
    assert infer_batch_size(profile) == 2


def test_stage_ids_and_crlf_are_accepted(tmp_path: Path) -> None:
    text = GOOD.replace("parameter_size=0.0\n", "parameter_size=0.0 -- stage_id=1\n")
    text = text.replace("\n", "\r\n")
    profile = read_graph_txt(_write(tmp_path, text), model="tiny")
    assert profile == read_graph_txt(_write(tmp_path, GOOD), model="tiny")


def test_node_order_is_numeric_topological(tmp_path: Path) -> None:
    text = (
        "node10 -- B -- forward_compute_time=1, backward_compute_time=1, activation_size=4, parameter_size=0\n"
        "node2 -- A -- forward_compute_time=1, backward_compute_time=1, activation_size=4, parameter_size=0\n"
        "node9 -- C -- forward_compute_time=1, backward_compute_time=1, activation_size=4, parameter_size=0\n"
        "\tnode2 -- node10\n\tnode2 -- node9\n\tnode9 -- node10\n"
    )
    profile = read_graph_txt(_write(tmp_path, text), batch_size=1)
    assert [layer.name for layer in profile.layers] == ["node2", "node9", "node10"]
    assert profile.layers[2].inputs == (0, 1)


def test_unexact_times_round_trip(tmp_path: Path) -> None:
    layers = (
        LayerProfile(
            name="a",
            op="X",
            forward_ms=1 / 3,
            backward_ms=2.5,
            output_bytes=(7,),
            parameter_bytes=3,
        ),
        LayerProfile(
            name="b",
            op="Y\nmore",
            forward_ms=0.0,
            backward_ms=1e-9,
            output_bytes=(1, 2, 3),
            parameter_bytes=0,
            inputs=(0,),
        ),
    )
    profile = Profile(model="m", batch_size=4, layers=layers)
    write_graph_txt(profile, tmp_path / "g.txt")
    back = read_graph_txt(tmp_path / "g.txt", batch_size=4)
    assert back.layers[0].forward_ms == 1 / 3
    assert back.layers[1].backward_ms == 1e-9
    assert back.layers[1].op == "Ymore"
    assert back.layers[1].output_bytes == (1, 2, 3)


def test_export_refuses_names_with_spaces(tmp_path: Path) -> None:
    profile = Profile(
        model="m",
        batch_size=1,
        layers=(
            LayerProfile(
                name="a b",
                op="X",
                forward_ms=1,
                backward_ms=1,
                output_bytes=(1,),
                parameter_bytes=0,
            ),
        ),
    )
    with pytest.raises(ProfileError, match="rename"):
        write_graph_txt(profile, tmp_path / "g.txt")
    assert not (tmp_path / "g.txt").exists()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", "no node lines"),
        (
            GOOD.replace("forward_compute_time=1.5", "forward_compute_time=fast"),
            r"graph.txt:2: .*forward_compute_time='fast'",
        ),
        (GOOD.replace("backward_compute_time=2.0, ", ""), r"graph.txt:2: .*needs exactly"),
        (GOOD.replace("node2 -- Linear", "node2 Linear"), r"graph.txt:2: .*cannot read node line"),
        (
            GOOD.replace("\tnode2 -- node3", "\tnode2 -> node3"),
            r"graph.txt:5: .*cannot read edge line",
        ),
        (
            GOOD.replace("\tnode2 -- node3", "\tnode2 -- node7"),
            r"graph.txt:5: .*unknown node node7",
        ),
        (GOOD + "\tnode3 -- node1\n", r"cycle \(node1 -> node2 -> node3 -> node1\)"),
        (GOOD + "\tnode3 -- node3\n", "cycle"),
        (
            GOOD.replace("activation_size=[40.0; 40.0]", "activation_size=[40.0; 40"),
            r"graph.txt:3: .*\[a; b; c\]",
        ),
        (GOOD.replace("activation_size=80.0", "activation_size=-80.0"), r"graph.txt:2: .*>= 0"),
        (GOOD.replace("activation_size=80.0", "activation_size=nan"), r"graph.txt:2: "),
        (GOOD + GOOD.split("\n")[0] + "\n", r"graph.txt:6: node node1 is defined again"),
    ],
)
def test_malformed_graph_is_refused(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ProfileError, match=pattern) as info:
        read_graph_txt(_write(tmp_path, text), batch_size=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("cut", [40, 100, len(GOOD) - 30, len(GOOD) - 17, len(GOOD) - 3])
def test_truncated_graph_is_refused(tmp_path: Path, cut: int) -> None:
    with pytest.raises(ProfileError, match=r"graph.txt(:\d+)?: ") as info:
        read_graph_txt(_write(tmp_path, GOOD[:cut]), batch_size=1)
    assert "\n" not in str(info.value)


def test_truncated_shared_profile_is_refused(shared_dir: Path, tmp_path: Path) -> None:
    text = (shared_dir / "resnet50" / "graph.txt").read_text()
    for cut in (len(text) // 3, len(text) // 2, len(text) - 5):
        with pytest.raises(ProfileError, match=r"graph\.txt"):
            read_graph_txt(_write(tmp_path, text[:cut]), batch_size=128)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        read_graph_txt(tmp_path / "nope" / "graph.txt")


def test_preprocess_refuses_empty_result() -> None:
    profile = Profile(
        model="m",
        batch_size=1,
        layers=(
            LayerProfile(
                name="n1",
                op="Input",
                forward_ms=1,
                backward_ms=0,
                output_bytes=(1,),
                parameter_bytes=0,
            ),
        ),
    )
    with pytest.raises(ProfileError, match="nothing to plan"):
        pipedream_preprocess(profile)
