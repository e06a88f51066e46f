"""PipeDream's V100 profiles mapped onto the fx layers of the same torchvision models.

PipeDream (msr-fiddle/pipedream, MIT) ships per-layer profiles of torchvision's ResNet-50, VGG16,
ResNet-18 and AlexNet measured on NVIDIA V100 GPUs (``graph.txt``; batch 128 for ResNet-50 and
VGG16, 256 for ResNet-18 and AlexNet). Imported as they are (:mod:`planner.profile.pipedream`)
their layers are PipeDream's graph nodes (``node17``), which no model has, so such a plan cannot
run. :func:`map_onto_model` gives each fx layer of the torchvision model the times and sizes of
its PipeDream node, so the profile stands for a V100 and its plans run here (``plan run``).

**Structure match, checked.** Both graphs are DAGs of the same modules. PipeDream's ``Input`` is
the model input; its ``Size`` + ``View`` pair is fx's ``flatten``; ``AvgPool2d`` is today's
``AdaptiveAvgPool2d``; ``Add`` is ``add``. Walking the fx layers in topological order, a layer
matches the unmatched PipeDream node of the same kind (and the same sizes: channels, kernels,
features) whose inputs are the matches of the layer's inputs. fx layers PipeDream's model did not
have (VGG's and AlexNet's ``AdaptiveAvgPool2d``, an identity at 224x224, added to torchvision
after PipeDream profiled) pass their input through at 0 ms. Then every PipeDream node must be
matched and every fx edge must be a PipeDream edge; otherwise :class:`ProfileError`.

Example:
    >>> profile = v100_profile("resnet50", Path("../shared/pipedream-profiles"))  # doctest: +SKIP
    >>> profile.device, profile.batch_size, profile.layers[0].name             # doctest: +SKIP
    ('v100', 128, 'conv1')
"""

from __future__ import annotations

import re
from pathlib import Path

from planner.errors import ProfileError
from planner.profile.format import LayerProfile, Profile

__all__ = ["V100_MODELS", "map_onto_model", "v100_profile"]

V100_MODELS = ("resnet50", "vgg16", "resnet18", "alexnet")
"""torchvision models whose PipeDream V100 profile maps onto their fx layers."""

_KIND = {"add": "Add", "flatten": "View", "AdaptiveAvgPool2d": "AvgPool2d"}
_SIZED = ("Conv2d", "Linear", "BatchNorm2d", "MaxPool2d")
_PASS_THROUGH = ("AdaptiveAvgPool2d",)


def _kind(op: str) -> str:
    name = re.split(r"[(\[]", op, maxsplit=1)[0].strip()
    return _KIND.get(name, name)


def _signature(op: str) -> tuple[str, tuple[int, ...]]:
    """Kind plus, for sized modules, every integer in the description (channels, kernel...)."""
    kind = _kind(op)
    if kind not in _SIZED:
        return kind, ()
    body = op.split("(", 1)[1] if "(" in op else ""
    body = re.sub(r"eps=[^,)]*|momentum=[^,)]*", "", body)
    return kind, tuple(int(x) for x in re.findall(r"(?<![\w.])\d+(?![\w.])", body))


def map_onto_model(pipedream: Profile, model: str, *, source_path: str) -> Profile:
    """``pipedream``'s costs on the fx layers of torchvision ``model`` (module docstring).

    Raises:
        ProfileError: The graphs do not match (with the first layer that fails).
    """
    from planner.models import load_model
    from planner.profile.capture import capture

    spec = load_model(model, batch_size=1)
    graph = capture(spec.module)
    pd = pipedream.layers
    # PipeDream's graph without Input and Size: a node's inputs, with Size's input instead.
    skipped = {i for i, layer in enumerate(pd) if _kind(layer.op) in ("Input", "Size")}

    def pd_inputs(i: int) -> frozenset[int]:
        out: set[int] = set()
        for j in pd[i].inputs:
            out |= pd_inputs(j) if _kind(pd[j].op) == "Size" else ({j} - skipped)
        return frozenset(out)

    unmatched = {i for i in range(len(pd)) if i not in skipped}
    match: dict[int, int | None] = {}  # fx layer -> PipeDream node (None: passes through)
    for f, layer in enumerate(graph.layers):
        wanted: set[int] = set()
        for j in layer.inputs:
            mapped = match[j]
            wanted |= {mapped} if mapped is not None else _through(j, graph, match)
        signature = _signature(layer.op)
        candidates = [
            i
            for i in sorted(unmatched)
            if _signature(pd[i].op) == signature and pd_inputs(i) == wanted
        ]
        if not candidates and layer.op.split("(")[0] in _PASS_THROUGH:
            match[f] = None
            continue
        if not candidates:
            raise ProfileError(
                f"{model}: fx layer {layer.name} ({layer.op}) has no PipeDream node of the same "
                f"kind reading the same inputs in {source_path}; the profiles are of different models"
            )
        match[f] = candidates[0]
        unmatched.discard(candidates[0])
    if unmatched:
        first = pd[min(unmatched)]
        raise ProfileError(
            f"{model}: PipeDream node {first.name} ({first.op}) matches no fx layer; "
            "the profiles are of different models"
        )
    layers: list[LayerProfile] = []
    for f, layer in enumerate(graph.layers):
        i = match[f]
        if i is None:
            source = next(j for j in layer.inputs)  # identity: the input's bytes, no time
            nbytes = layers[source].output_bytes
            layers.append(
                LayerProfile(
                    name=layer.name,
                    op=layer.op,
                    forward_ms=0.0,
                    backward_ms=0.0,
                    output_bytes=nbytes,
                    parameter_bytes=0,
                    inputs=layer.inputs,
                )
            )
            continue
        node = pd[i]
        extra = [pd[j] for j in range(len(pd)) if _kind(pd[j].op) == "Size" and i in _users(pd, j)]
        layers.append(
            LayerProfile(
                name=layer.name,
                op=layer.op,
                forward_ms=node.forward_ms + sum(x.forward_ms for x in extra),
                backward_ms=node.backward_ms + sum(x.backward_ms for x in extra),
                output_bytes=node.output_bytes,
                parameter_bytes=node.parameter_bytes,
                inputs=layer.inputs,
            )
        )
    passed = [graph.layers[f].name for f, i in match.items() if i is None]
    note = f"; {', '.join(passed)} not in PipeDream's model: 0 ms (identity)" if passed else ""
    return Profile(
        model=model,
        batch_size=pipedream.batch_size,
        layers=tuple(layers),
        input_shape=(3, 224, 224),
        dtype="float32",
        device="v100",
        source="pipedream-mapped",
        torch_version=None,
        graph_hash=graph.graph_hash,
        device_name="NVIDIA Tesla V100",
        machine=(
            f"NVIDIA V100 (fp32), measured by PipeDream's profiler at batch "
            f"{pipedream.batch_size} (msr-fiddle/pipedream, MIT; PyTorch version not recorded "
            f"in graph.txt); mapped by planner onto torchvision {model}'s fx layers, "
            f"{len(pd) - len(skipped)} nodes matched by structure{note}"
        ),
    )


def _through(f: int, graph: object, match: dict[int, int | None]) -> set[int]:
    """PipeDream nodes feeding a pass-through fx layer."""
    layers = graph.layers  # type: ignore[attr-defined]
    out: set[int] = set()
    for j in layers[f].inputs:
        mapped = match[j]
        out |= {mapped} if mapped is not None else _through(j, graph, match)
    return out


def _users(pd: tuple[LayerProfile, ...], j: int) -> set[int]:
    return {i for i, layer in enumerate(pd) if j in layer.inputs}


def v100_profile(model: str, profiles_dir: Path) -> Profile:
    """PipeDream's V100 profile of ``model`` (``profiles_dir/<model>/graph.txt``), mapped.

    Raises:
        ProfileError: No such profile, or it does not map onto the model.
    """
    from planner.profile.pipedream import read_graph_txt

    if model not in V100_MODELS:
        raise ProfileError(f"no V100 profile maps onto {model}; have: {', '.join(V100_MODELS)}")
    path = profiles_dir / model / "graph.txt"
    return map_onto_model(read_graph_txt(path), model, source_path=str(path))


def main(argv: list[str] | None = None) -> int:
    """``python -m planner.profile.v100 PIPEDREAM_PROFILES OUT_DIR``: write ``<model>-v100.json``."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(
            "usage: python -m planner.profile.v100 PIPEDREAM_PROFILES_DIR OUT_DIR", file=sys.stderr
        )
        return 2
    source, out = Path(args[0]), Path(args[1])
    for model in V100_MODELS:
        path = out / f"{model}-v100.json"
        v100_profile(model, source).save(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
