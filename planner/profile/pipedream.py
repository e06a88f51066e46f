"""PipeDream's ``graph.txt`` profiles: import, export, and PipeDream's optimizer preprocessing.

PipeDream (msr-fiddle/pipedream) stores a profile as text. Node lines::

    node4 -- Conv2d(3, 64, ...) -- forward_compute_time=2.1, backward_compute_time=3.0, activation_size=411041792.0, parameter_size=9408.0

(times in milliseconds for one batch, sizes in bytes; ``activation_size`` may be a list
``[a; b; c]`` for nodes with several outputs; a partitioned graph may end a node line with
`` -- stage_id=N``), and tab-indented edge lines ``\\tnode4 -- node5``. Node lines are in no
particular order.

Import is lossless for everything the file says: every node is kept (``Input`` sources with their
data-loading time, ``__getitem__`` sinks, ...), the node id becomes the layer name and the
description the layer's ``op``, and an edge's order among a node's in-edges is kept. Layers are
put in a deterministic topological order: the lexicographic topological sort keyed by the number
in the node id (``node2`` before ``node10``). Export writes the same information back in
PipeDream's own format, so import, export, import gives an identical :class:`Profile`. Two things
are not round-tripped because our profile has no place for them: ``stage_id`` annotations (read and
dropped) and newlines inside an ``op`` (PipeDream's writer removes them too).

For planning as PipeDream's optimizer plans, apply :func:`pipedream_preprocess`, which drops the
``Input`` sources and unused ``__getitem__`` sinks exactly as ``optimizer_graph_hierarchical.py``
does before it builds its states.

The batch size: a graph.txt does not record it. :func:`read_graph_txt` takes it from the caller, or
infers it only for image classifiers where two independent facts agree: every top-level
``Linear(..., out_features=N, ...)`` has a float32 ``(B, N)`` output (``activation_size == 4 B N``)
with one common ``B``, and the single ``Input`` node's activation is a float32 ``(B, 3, H, H)``
image. Otherwise (e.g. GNMT) it refuses and asks for ``batch_size``.

Example:
    >>> import tempfile, os
    >>> text = (
    ...     "node1 -- Input -- forward_compute_time=5.000, backward_compute_time=0.000, "
    ...     "activation_size=1204224.000, parameter_size=0.000\\n"
    ...     "node2 -- Linear(in_features=150528, out_features=10, bias=True) -- "
    ...     "forward_compute_time=1.500, backward_compute_time=2.000, activation_size=80.000, "
    ...     "parameter_size=6021160.000\\n"
    ...     "\\tnode1 -- node2\\n"
    ... )
    >>> path = os.path.join(tempfile.mkdtemp(), "graph.txt")
    >>> _ = open(path, "w").write(text)
    >>> p = read_graph_txt(path, model="tiny")
    >>> p.batch_size, p.input_shape, [layer.name for layer in p.layers]
    (2, (3, 224, 224), ['node1', 'node2'])
    >>> write_graph_txt(p, path + ".out")
    >>> read_graph_txt(path + ".out", model="tiny") == p
    True
    >>> [layer.name for layer in pipedream_preprocess(p).layers]
    ['node2']
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import networkx as nx

from planner._io import atomic_write_text
from planner.errors import ProfileError
from planner.profile.format import LayerProfile, Profile, graph_hash

__all__ = [
    "PIPEDREAM_DEVICE",
    "graph_txt",
    "infer_batch_size",
    "pipedream_preprocess",
    "read_graph_txt",
    "write_graph_txt",
]

PIPEDREAM_DEVICE = "V100 (PipeDream)"
_FLOAT32_BYTES = 4
_IMAGE_CHANNELS = 3
_KEYS = ("forward_compute_time", "backward_compute_time", "activation_size", "parameter_size")
_SEP = " -- "
_NODE_NUMBER = re.compile(r"(\d+)$")
_LINEAR = re.compile(r"Linear\(in_features=\d+, out_features=(\d+)\b")
_FIX = "regenerate it with PipeDream's profiler or fix the line"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Node:
    """One parsed node line."""

    name: str
    op: str
    forward_ms: float
    backward_ms: float
    output_bytes: tuple[int, ...]
    parameter_bytes: int
    line: int


def read_graph_txt(
    path: str | os.PathLike[str], *, batch_size: int | None = None, model: str | None = None
) -> Profile:
    """Import a PipeDream ``graph.txt`` as a :class:`Profile`, keeping every node.

    Args:
        path: The graph.txt file.
        batch_size: Samples per profiled batch (PipeDream's "minibatch" that flows). When None, it
            is inferred for image classifiers (see the module docstring) and refused otherwise.
        model: The profile's model name; default: the file's folder name when the file is called
            ``graph.txt`` (PipeDream's layout ``profiles/<model>/graph.txt``), else its stem.

    Returns:
        A profile with ``source="pipedream"``, ``device="V100 (PipeDream)"``, float32, layers in the
        lexicographic topological order by node number.

    Raises:
        ProfileError: The file is missing, malformed, truncated, has an edge to an unknown node or a
            cycle (the message names the file and line), or the batch size cannot be inferred.

    Example:
        >>> p = read_graph_txt("../shared/pipedream-profiles/vgg16/graph.txt")  # doctest: +SKIP
        >>> p.batch_size, len(p)  # doctest: +SKIP
        (128, 41)
    """
    file = Path(path)
    nodes, edges = _parse(file)
    order = _topological_order(file, nodes, edges)
    index = {name: i for i, name in enumerate(order)}
    inputs: dict[str, list[int]] = {name: [] for name in order}
    for source, target, _ in edges:
        if index[source] not in inputs[target]:
            inputs[target].append(index[source])
    layers = tuple(
        LayerProfile(
            name=name,
            op=nodes[name].op,
            forward_ms=nodes[name].forward_ms,
            backward_ms=nodes[name].backward_ms,
            output_bytes=nodes[name].output_bytes,
            parameter_bytes=nodes[name].parameter_bytes,
            inputs=tuple(inputs[name]),
        )
        for name in order
    )
    inferred, input_shape = _infer(layers)
    if batch_size is None:
        if inferred is None:
            raise ProfileError(
                f"{file}: cannot infer the batch size (no float32 image Input with agreeing "
                "Linear outputs); pass it explicitly: batch_size= (CLI: --batch-size)"
            )
        batch_size = inferred
    elif not isinstance(batch_size, int) or batch_size < 1:
        raise ProfileError(f"batch size must be a positive whole number, got {batch_size!r}")
    elif inferred is not None and inferred != batch_size:
        raise ProfileError(
            f"{file}: the layer sizes say batch size {inferred} (Input and Linear activations), "
            f"not {batch_size}; pass {inferred} or leave the batch size out"
        )
    elif inferred is None:
        input_shape = _image_shape(layers, batch_size)
    if model is None:
        model = file.parent.name if file.name == "graph.txt" and file.parent.name else file.stem
    return Profile(
        model=model,
        batch_size=batch_size,
        layers=layers,
        input_shape=input_shape,
        dtype="float32",
        device=PIPEDREAM_DEVICE,
        source="pipedream",
        graph_hash=graph_hash((layer.name, layer.op, layer.inputs) for layer in layers),
        machine="NVIDIA V100 (PipeDream's profiler)",
    )


def write_graph_txt(profile: Profile, path: str | os.PathLike[str]) -> None:
    """Write :func:`graph_txt` of ``profile`` to ``path`` atomically."""
    atomic_write_text(path, graph_txt(profile))


def graph_txt(profile: Profile) -> str:
    """``profile`` as the text of a PipeDream ``graph.txt``, readable by PipeDream.

    Node lines come in the profile's order, then one edge line per input, grouped by the reading
    layer. Times are written with PipeDream's three decimals when that is exact, else in full.
    The batch size and other metadata have no place in the format and are not written.

    Raises:
        ProfileError: A layer name is empty or contains whitespace, which the format cannot hold.

    Example:
        >>> from planner.profile import LayerProfile, Profile
        >>> p = Profile(model="m", batch_size=1, layers=(
        ...     LayerProfile(name="node1", op="ReLU", forward_ms=0.25, backward_ms=0.5,
        ...                  output_bytes=(16,), parameter_bytes=0),))
        >>> graph_txt(p)
        'node1 -- ReLU -- forward_compute_time=0.250, backward_compute_time=0.500, activation_size=16.000, parameter_size=0.000\\n'
    """
    lines = []
    for index, layer in enumerate(profile.layers):
        if not layer.name or any(c.isspace() for c in layer.name):
            raise ProfileError(
                f"layer {index} is named {layer.name!r}; graph.txt node ids cannot be empty or "
                "contain spaces; rename the layer before exporting"
            )
        op = layer.op.replace("\n", "").replace("\r", "")
        if len(layer.output_bytes) == 1:
            activation = _fmt_bytes(layer.output_bytes[0])
        else:
            activation = "[" + "; ".join(_fmt_bytes(b) for b in layer.output_bytes) + "]"
        lines.append(
            f"{layer.name}{_SEP}{op}{_SEP}forward_compute_time={_fmt_ms(layer.forward_ms)}, "
            f"backward_compute_time={_fmt_ms(layer.backward_ms)}, activation_size={activation}, "
            f"parameter_size={_fmt_bytes(layer.parameter_bytes)}"
        )
    for layer in profile.layers:
        lines.extend(f"\t{profile.layers[i].name}{_SEP}{layer.name}" for i in layer.inputs)
    return "\n".join(lines) + "\n"


def pipedream_preprocess(profile: Profile) -> Profile:
    """The profile PipeDream's optimizer actually plans on.

    ``optimizer_graph_hierarchical.py`` (``main``), before building its antichain states:

    1. every source node (no in-edges) whose description starts with ``Input`` is zeroed and
       removed with its out-edges: the input always lives with the first stage, and its time is
       data loading, not compute;
    2. then, in one pass over the sinks of the remaining graph, every sink whose description
       starts with ``__getitem__`` (an unused output of a multi-output node) is removed. A node
       that becomes a sink only through that removal is kept, as in PipeDream.

    Everything else is unchanged; layer indices are renumbered and the graph hash recomputed.

    Raises:
        ProfileError: Nothing would be left to plan.

    Example:
        >>> from planner.profile import LayerProfile, Profile
        >>> def layer(name, op, inputs=()):
        ...     return LayerProfile(name=name, op=op, forward_ms=1.0, backward_ms=1.0,
        ...                         output_bytes=(8,), parameter_bytes=0, inputs=inputs)
        >>> p = Profile(model="m", batch_size=1, layers=(
        ...     layer("node1", "Input"), layer("node2", "LSTM", (0,)),
        ...     layer("node3", "__getitem__(0)", (1,)), layer("node4", "__getitem__(1)", (1,)),
        ...     layer("node5", "Linear", (2,))))
        >>> [x.name for x in pipedream_preprocess(p).layers]
        ['node2', 'node3', 'node5']
    """
    layers = profile.layers
    removed = {
        i for i, layer in enumerate(layers) if not layer.inputs and layer.op.startswith("Input")
    }
    consumers: list[set[int]] = [set() for _ in layers]
    for i, layer in enumerate(layers):
        if i not in removed:
            for source in layer.inputs:
                consumers[source].add(i)
    removed |= {
        i
        for i, layer in enumerate(layers)
        if i not in removed and not consumers[i] and layer.op.startswith("__getitem__")
    }
    if len(removed) == len(layers):
        raise ProfileError(
            f"profile of {profile.model!r} has only Input and __getitem__ nodes; nothing to plan"
        )
    kept = [i for i in range(len(layers)) if i not in removed]
    renumber = {old: new for new, old in enumerate(kept)}
    new_layers = tuple(
        dataclasses.replace(
            layers[i], inputs=tuple(renumber[s] for s in layers[i].inputs if s in renumber)
        )
        for i in kept
    )
    return dataclasses.replace(
        profile,
        layers=new_layers,
        graph_hash=graph_hash((layer.name, layer.op, layer.inputs) for layer in new_layers),
    )


def infer_batch_size(profile: Profile) -> int | None:
    """The batch size the layers imply for an image classifier, or None if they do not tell.

    See the module docstring for the rule (float32 ``Linear`` outputs and a 3-channel square image
    ``Input`` must agree).

    Example:
        >>> from planner.profile import LayerProfile, Profile
        >>> p = Profile(model="m", batch_size=1, layers=(
        ...     LayerProfile(name="node1", op="Input", forward_ms=0.0, backward_ms=0.0,
        ...                  output_bytes=(8 * 3 * 32 * 32 * 4,), parameter_bytes=0),
        ...     LayerProfile(name="node2", op="Linear(in_features=3072, out_features=10, bias=True)",
        ...                  forward_ms=1.0, backward_ms=1.0, output_bytes=(8 * 10 * 4,),
        ...                  parameter_bytes=122920, inputs=(0,))))
        >>> infer_batch_size(p)
        8
    """
    return _infer(profile.layers)[0]


# --- parsing --------------------------------------------------------------------------------


def _parse(file: Path) -> tuple[dict[str, _Node], list[tuple[str, str, int]]]:
    """Node lines by id, and edges ``(source, target, line)`` in file order."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"PipeDream graph {file} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read PipeDream graph {file}: {exc}") from None
    nodes: dict[str, _Node] = {}
    edges: list[tuple[str, str, int]] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        if line[0].isspace():
            edges.append(_parse_edge(file, number, line))
            continue
        node = _parse_node(file, number, line)
        if node.name in nodes:
            raise ProfileError(
                f"{file}:{number}: node {node.name} is defined again (first on line "
                f"{nodes[node.name].line}); node ids must be unique, {_FIX}"
            )
        nodes[node.name] = node
    if not nodes:
        raise ProfileError(f"{file} has no node lines; is it empty or truncated? {_FIX}")
    for source, target, number in edges:
        for end in (source, target):
            if end not in nodes:
                raise ProfileError(
                    f"{file}:{number}: edge {source} -- {target} names unknown node {end}; "
                    f"is the file truncated? {_FIX}"
                )
    if len(nodes) > 1:
        linked = {end for source, target, _ in edges for end in (source, target)}
        for name, node in nodes.items():
            if name not in linked:
                raise ProfileError(
                    f"{file}:{node.line}: node {name} has no edges (PipeDream graphs are "
                    f"connected); is the file truncated? {_FIX}"
                )
    return nodes, edges


def _parse_edge(file: Path, number: int, line: str) -> tuple[str, str, int]:
    parts = line.strip().split(_SEP)
    if len(parts) != 2 or not all(parts) or any(c.isspace() for p in parts for c in p):
        raise ProfileError(
            f"{file}:{number}: cannot read edge line {line.strip()[:60]!r}; expected a tab then "
            f"'nodeA -- nodeB'; {_FIX}"
        )
    return parts[0], parts[1], number


def _parse_node(file: Path, number: int, line: str) -> _Node:
    parts = line.split(_SEP)
    if len(parts) >= 4 and re.fullmatch(r"stage_id=\d+", parts[-1].strip()):
        parts = parts[:-1]  # a partitioned graph's stage annotation; we do not keep it
    if len(parts) < 3 or not parts[0] or any(c.isspace() for c in parts[0]):
        raise ProfileError(
            f"{file}:{number}: cannot read node line {line[:60]!r}; expected "
            f"'nodeN -- description -- forward_compute_time=..., ...'; is it truncated? {_FIX}"
        )
    name, op, metadata = parts[0], _SEP.join(parts[1:-1]), parts[-1]
    fields: dict[str, str] = {}
    for item in metadata.split(", "):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _KEYS or key in fields:
            break
        fields[key] = value.strip()
    if tuple(fields) != _KEYS:
        raise ProfileError(
            f"{file}:{number}: node {name} needs exactly {', '.join(k + '=' for k in _KEYS)} "
            f"in that order, got {metadata[:80]!r}; is the line truncated? {_FIX}"
        )
    forward_ms = _number(file, number, name, "forward_compute_time", fields["forward_compute_time"])
    backward_ms = _number(
        file, number, name, "backward_compute_time", fields["backward_compute_time"]
    )
    activation = fields["activation_size"]
    if activation.startswith("[") or activation.endswith("]"):
        if not (activation.startswith("[") and activation.endswith("]") and len(activation) > 2):
            raise ProfileError(
                f"{file}:{number}: node {name} has activation_size {activation!r}; a list must "
                f"look like [a; b; c]; is the line truncated? {_FIX}"
            )
        items = activation[1:-1].split(";")
    else:
        items = [activation]
    output_bytes = tuple(
        _bytes(file, number, name, "activation_size", item.strip()) for item in items
    )
    parameter_bytes = _bytes(file, number, name, "parameter_size", fields["parameter_size"])
    return _Node(
        name=name,
        op=op,
        forward_ms=forward_ms,
        backward_ms=backward_ms,
        output_bytes=output_bytes,
        parameter_bytes=parameter_bytes,
        line=number,
    )


def _number(file: Path, number: int, name: str, key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ProfileError(
            f"{file}:{number}: node {name} has {key}={text!r}; expected a number >= 0; {_FIX}"
        )
    return value


def _bytes(file: Path, number: int, name: str, key: str, text: str) -> int:
    # PipeDream writes byte counts as floats ("411041792.000"); a fraction of a byte means nothing,
    # so the nearest whole number is kept.
    return round(_number(file, number, name, key, text))


def _topological_order(
    file: Path, nodes: dict[str, _Node], edges: list[tuple[str, str, int]]
) -> list[str]:
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    line_of: dict[tuple[str, str], int] = {}
    for source, target, number in edges:
        graph.add_edge(source, target)
        line_of.setdefault((source, target), number)
    try:
        return list(nx.lexicographical_topological_sort(graph, key=_node_key))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(graph)
        path = " -> ".join([a for a, _ in cycle] + [cycle[0][0]])
        first = min(line_of[(a, b)] for a, b in cycle)
        raise ProfileError(
            f"{file}:{first}: the edges form a cycle ({path}); a profile must be a DAG; {_FIX}"
        ) from None


def _node_key(name: str) -> str:
    """Sort key: the number at the end of the id (zero-padded so it sorts as text), then the id."""
    match = _NODE_NUMBER.search(name)
    return f"{int(match.group(1)) if match else 0:020d}{name}"


# --- export formatting ----------------------------------------------------------------------


def _fmt_ms(value: float) -> str:
    short = f"{value:.3f}"
    return short if float(short) == value else repr(float(value))


def _fmt_bytes(value: int) -> str:
    return f"{value}.000"


# --- batch size -----------------------------------------------------------------------------


def _infer(layers: tuple[LayerProfile, ...]) -> tuple[int | None, tuple[int, ...]]:
    """(batch size, input shape) for an image classifier whose sizes agree, else (None, ())."""
    candidates = set()
    for layer in layers:
        match = _LINEAR.match(layer.op)
        if match is None or len(layer.output_bytes) != 1:
            continue
        per_sample = _FLOAT32_BYTES * int(match.group(1))
        if per_sample == 0 or layer.output_bytes[0] % per_sample:
            return None, ()
        candidates.add(layer.output_bytes[0] // per_sample)
    if len(candidates) != 1:
        return None, ()
    (batch,) = candidates
    if batch < 1:
        return None, ()
    shape = _image_shape(layers, batch)
    return (batch, shape) if shape else (None, ())


def _image_shape(layers: tuple[LayerProfile, ...], batch: int) -> tuple[int, ...]:
    """``(3, H, H)`` if the single Input source holds a float32 batch of square RGB images."""
    sources = [x for x in layers if not x.inputs and x.op.startswith("Input")]
    if len(sources) != 1 or len(sources[0].output_bytes) != 1:
        return ()
    per_image, rest = divmod(sources[0].output_bytes[0], batch * _IMAGE_CHANNELS * _FLOAT32_BYTES)
    side = math.isqrt(per_image)
    if rest or per_image == 0 or side * side != per_image:
        return ()
    return (_IMAGE_CHANNELS, side, side)
