"""The profile: per-layer costs and the layer DAG, and its JSON file ``planner.profile/2``.

A profile is what every later part reads. Layers are stored in a topological order; each names
the layers it takes input from by index, so skip connections are explicit.

Example:
    >>> from planner.profile import LayerProfile, Profile
    >>> layers = (
    ...     LayerProfile(name="fc1", op="Linear(4, 8)", forward_ms=1.0, backward_ms=2.0,
    ...                  output_bytes=(256,), parameter_bytes=160),
    ...     LayerProfile(name="fc2", op="Linear(8, 2)", forward_ms=0.5, backward_ms=1.0,
    ...                  output_bytes=(64,), parameter_bytes=72, inputs=(0,)),
    ... )
    >>> p = Profile(model="mlp", batch_size=8, layers=layers)
    >>> Profile.from_json(p.to_json()) == p
    True
    >>> p.rescale(16).layers[0].forward_ms
    2.0
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from planner._io import atomic_write_text, lists_to_tuples, load_json, parse_json, validate
from planner.errors import ProfileError

if TYPE_CHECKING:
    import networkx as nx
    import pandas as pd

__all__ = ["FORMAT", "FORMAT_V1", "LayerProfile", "Profile", "graph_hash"]

FORMAT = "planner.profile/2"
FORMAT_V1 = "planner.profile/1"
"""The previous format: no backward split; it loads with B and W estimated (see
:meth:`LayerProfile.estimated_split_ms`) and ``Profile.backward_split == "estimated"``."""


@dataclass(frozen=True, kw_only=True)
class LayerProfile:
    """One layer (graph node) of a profiled model.

    Attributes:
        name: Unique name; for profiles we take, the torch.fx node name.
        op: Human description of the operation, e.g. ``"Conv2d(3, 64, kernel_size=(7, 7))"``.
        forward_ms: Forward time for one batch of the profile's batch size, milliseconds.
        backward_ms: Backward time (grads w.r.t. inputs and parameters), milliseconds.
        output_bytes: Bytes of each output tensor (exact, from shapes and dtypes).
        parameter_bytes: Bytes of the parameters this layer owns (shared ones counted once).
        inputs: Indices of the layers whose outputs this layer reads (all smaller than its own).
        saved_bytes: Bytes autograd saves for backward, or None where unknown (imported profiles).
        buffer_bytes: Bytes of non-parameter buffers (e.g. BatchNorm running statistics).
        target: The fx target: a module's qualified name or a function's name; "" if unknown.
        forward_samples_ms: The raw forward measurements behind ``forward_ms``.
        backward_samples_ms: The raw backward measurements behind ``backward_ms``.
        backward_input_ms: The input-gradient part of the backward (B of the zero-bubble
            schedules), milliseconds; None where unknown (:meth:`split_backward_ms` estimates).
        backward_weight_ms: The weight-gradient part (W), milliseconds; None where unknown.
    """

    name: str
    op: str
    forward_ms: float
    backward_ms: float
    output_bytes: tuple[int, ...]
    parameter_bytes: int
    inputs: tuple[int, ...] = ()
    saved_bytes: int | None = None
    buffer_bytes: int = 0
    target: str = ""
    forward_samples_ms: tuple[float, ...] = ()
    backward_samples_ms: tuple[float, ...] = ()
    backward_input_ms: float | None = None
    backward_weight_ms: float | None = None

    def estimated_split_ms(self) -> tuple[float, float]:
        """``(B, W)`` guessed from ``backward_ms``: half each for a layer with parameters (a
        dense layer's two gradients are matrix products of the same size), all B for one without.
        """
        if self.parameter_bytes > 0:
            return self.backward_ms / 2, self.backward_ms / 2
        return self.backward_ms, 0.0

    def split_backward_ms(self) -> tuple[float, float]:
        """``(B, W)``: the measured input- and weight-gradient times scaled to sum to
        ``backward_ms`` (measured apart, they need not add up exactly), else the estimate.

        Example:
            >>> LayerProfile(name="fc", op="", forward_ms=1, backward_ms=3, output_bytes=(),
            ...              parameter_bytes=8, backward_input_ms=1.0, backward_weight_ms=1.0,
            ...              ).split_backward_ms()
            (1.5, 1.5)
        """
        b, w = self.backward_input_ms, self.backward_weight_ms
        if b is None or w is None:
            return self.estimated_split_ms()
        if b + w <= 0:
            return (self.backward_ms, 0.0) if w == 0 else (0.0, self.backward_ms)
        scale = self.backward_ms / (b + w)
        return b * scale, w * scale

    @property
    def activation_bytes(self) -> int:
        """Bytes of all outputs together."""
        return sum(self.output_bytes)

    @property
    def compute_ms(self) -> float:
        """Forward plus backward time."""
        return self.forward_ms + self.backward_ms


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A profiled model: what was measured, how, and the layers in a topological order.

    Attributes:
        model: The model's name as given to ``--model`` (or a description for imports).
        batch_size: Samples per measured batch (PipeDream: the microbatch that flows).
        layers: The layers, in a topological order.
        input_shape: Shape of one sample, without the batch dimension.
        dtype: Parameter and activation dtype, e.g. ``"float32"``.
        device: Where it was measured, e.g. ``"cpu"``, ``"cuda"`` or ``"V100 (PipeDream)"``.
        source: ``"planner"`` when measured here, ``"pipedream"`` when imported.
        torch_version: torch version used for measuring, None for imports.
        graph_hash: Hash of the layer graph (names, ops, edges); see :func:`graph_hash`.
        threads: CPU threads used while measuring (fixed for the run), None on imports.
        warmup: Warm-up repetitions per layer.
        reps: Timed repetitions per layer (the median is kept).
        whole_step_ms: One measured whole-model forward+backward, milliseconds.
        calibration: How per-layer times were adjusted, if they were; None when raw.
        timer: The clock the times come from: ``"wall"`` (``time.perf_counter``, CUDA-synchronised
            on GPUs) or ``"cpu"`` (process CPU time); None when unknown (imports, older files).
        rescaled_from_batch_size: The measured batch size if this profile was rescaled.
        backward_split: Where the layers' ``backward_input_ms``/``backward_weight_ms`` come from:
            ``"measured"``, ``"estimated"`` (from ``backward_ms``: a ``planner.profile/1``
            file or an import), or None when the layers carry none.
        leaf_modules: Modules kept whole while tracing.
        allocator: CPU allocator setting while measuring: ``"keep-freed"`` (glibc malloc keeps
            freed memory, :func:`planner.profile.timing.keep_freed_memory`) or ``"default"``;
            None when unknown or not on the CPU.
        device_name: The GPU's name when measured on CUDA (``torch.cuda.get_device_name``).
        machine: Free text naming the machine that measured it.
        created: ISO date of measuring or importing.
    """

    model: str
    batch_size: int
    layers: tuple[LayerProfile, ...]
    input_shape: tuple[int, ...] = ()
    dtype: str = "float32"
    device: str = "cpu"
    source: str = "planner"
    torch_version: str | None = None
    graph_hash: str | None = None
    threads: int | None = None
    warmup: int | None = None
    reps: int | None = None
    whole_step_ms: float | None = None
    calibration: str | None = None
    timer: str | None = None
    rescaled_from_batch_size: int | None = None
    backward_split: str | None = None
    leaf_modules: tuple[str, ...] = ()
    allocator: str | None = None
    device_name: str | None = None
    machine: str | None = None
    created: str | None = None
    _names: dict[str, int] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ProfileError(f"profile batch size must be at least 1, got {self.batch_size}")
        if not self.layers:
            raise ProfileError(f"profile of {self.model!r} has no layers; profile a real model")
        names: dict[str, int] = {}
        for index, layer in enumerate(self.layers):
            if layer.name in names:
                raise ProfileError(
                    f"layer name {layer.name!r} appears twice (layers {names[layer.name]} and {index})"
                )
            names[layer.name] = index
            for source in layer.inputs:
                if not 0 <= source < index:
                    raise ProfileError(
                        f"layer {index} ({layer.name}) takes input from layer {source}, which does "
                        "not come before it; layers must be in a topological order"
                    )
            for key in ("forward_ms", "backward_ms"):
                value = getattr(layer, key)
                if not (math.isfinite(value) and value >= 0):
                    raise ProfileError(
                        f"layer {index} ({layer.name!r}) has {key} {value!r}; times must be "
                        "finite and 0 or more; fix the file or profile again"
                    )
            for key in ("backward_input_ms", "backward_weight_ms"):  # the split, where known
                value = getattr(layer, key)
                if value is not None and not (math.isfinite(value) and value >= 0):
                    raise ProfileError(
                        f"layer {index} ({layer.name!r}) has {key} {value!r}; times must be "
                        "finite and 0 or more; fix the file or profile again"
                    )
            if layer.parameter_bytes < 0 or any(b < 0 for b in layer.output_bytes):
                raise ProfileError(f"layer {index} ({layer.name}) has a negative size")
        object.__setattr__(self, "_names", names)

    # --- queries -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.layers)

    def index(self, name: str) -> int:
        """The index of the layer called ``name``."""
        try:
            return self._names[name]
        except KeyError:
            raise ProfileError(f"profile of {self.model!r} has no layer {name!r}") from None

    @property
    def total_forward_ms(self) -> float:
        return sum(layer.forward_ms for layer in self.layers)

    @property
    def total_backward_ms(self) -> float:
        return sum(layer.backward_ms for layer in self.layers)

    @property
    def total_compute_ms(self) -> float:
        """Sum of per-layer forward and backward times."""
        return self.total_forward_ms + self.total_backward_ms

    @property
    def total_parameter_bytes(self) -> int:
        return sum(layer.parameter_bytes for layer in self.layers)

    def consumers(self) -> list[list[int]]:
        """For each layer, the indices of the layers that read its output."""
        out: list[list[int]] = [[] for _ in self.layers]
        for index, layer in enumerate(self.layers):
            for source in layer.inputs:
                out[source].append(index)
        return out

    def to_networkx(self) -> nx.DiGraph:
        """The layer DAG; nodes are indices carrying the LayerProfile as attribute ``layer``."""
        import networkx as nx

        graph = nx.DiGraph()
        for index, layer in enumerate(self.layers):
            graph.add_node(index, layer=layer)
            graph.add_edges_from((source, index) for source in layer.inputs)
        return graph

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer: name, op, times, sizes and inputs (names), indexed by layer id."""
        import pandas as pd

        rows = [
            {
                "name": layer.name,
                "op": layer.op,
                "forward_ms": layer.forward_ms,
                "backward_ms": layer.backward_ms,
                "activation_bytes": layer.activation_bytes,
                "saved_bytes": layer.saved_bytes,
                "parameter_bytes": layer.parameter_bytes,
                "buffer_bytes": layer.buffer_bytes,
                "inputs": [self.layers[i].name for i in layer.inputs],
            }
            for layer in self.layers
        ]
        frame = pd.DataFrame(rows)
        frame.index.name = "layer"
        return frame

    # --- transformations -----------------------------------------------------------------

    def rescale(self, batch_size: int) -> Profile:
        """This profile scaled linearly to another batch size.

        Times, activations and saved tensors scale with the batch (per-sample cost times the new
        batch size); parameters and buffers stay fixed. Linear scaling is exact for activation
        sizes and a first-order estimate for times: small batches use an accelerator less
        efficiently, so profile at the batch size you will run when you can. The result records
        the measured batch size in ``rescaled_from_batch_size``.
        """
        if batch_size < 1:
            raise ProfileError(f"cannot rescale to batch size {batch_size}; use a positive size")
        if batch_size == self.batch_size:
            return self
        factor = batch_size / self.batch_size

        def scale_bytes(value: int) -> int:
            return round(value * factor)

        layers = tuple(
            dataclasses.replace(
                layer,
                forward_ms=layer.forward_ms * factor,
                backward_ms=layer.backward_ms * factor,
                backward_input_ms=_times(layer.backward_input_ms, factor),
                backward_weight_ms=_times(layer.backward_weight_ms, factor),
                output_bytes=tuple(scale_bytes(b) for b in layer.output_bytes),
                saved_bytes=None if layer.saved_bytes is None else scale_bytes(layer.saved_bytes),
                forward_samples_ms=(),
                backward_samples_ms=(),
            )
            for layer in self.layers
        )
        return dataclasses.replace(
            self,
            batch_size=batch_size,
            layers=layers,
            whole_step_ms=None if self.whole_step_ms is None else self.whole_step_ms * factor,
            rescaled_from_batch_size=self.rescaled_from_batch_size or self.batch_size,
        )

    # --- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready document, ``{"format": "planner.profile/2", ...}``."""
        doc: dict[str, Any] = {"format": FORMAT}
        for f in dataclasses.fields(self):
            if f.name in ("layers", "_names"):
                continue
            value = getattr(self, f.name)
            doc[f.name] = list(value) if isinstance(value, tuple) else value
        doc["layers"] = [
            {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(layer).items()
            }
            for layer in self.layers
        ]
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, doc: Any, what: str = "profile") -> Profile:
        """Build a profile from a parsed document, validating it against the shipped schema.

        A ``planner.profile/1`` document loads with every layer's B and W estimated
        (:meth:`LayerProfile.estimated_split_ms`) and ``backward_split="estimated"``.
        """
        if isinstance(doc, dict) and doc.get("format") not in (FORMAT, FORMAT_V1):
            raise ProfileError(
                f"{what} has format {doc.get('format')!r}, expected {FORMAT_V1!r} or {FORMAT!r}; "
                "re-create it with `plan profile` or `plan import-pipedream`"
            )
        validate(doc, "profile", ProfileError, what)
        fields = {f.name for f in dataclasses.fields(cls)} - {"layers", "_names"}
        kwargs = lists_to_tuples({k: v for k, v in doc.items() if k in fields})
        layers = tuple(LayerProfile(**lists_to_tuples(layer)) for layer in doc["layers"])
        if doc["format"] == FORMAT_V1:  # no split measured then: estimate it, and say so
            layers = tuple(_with_estimated_split(layer) for layer in layers)
            kwargs["backward_split"] = "estimated"
        return cls(layers=layers, **kwargs)

    @classmethod
    def from_json(cls, text: str, what: str = "profile") -> Profile:
        return cls.from_dict(parse_json(text, ProfileError, what), what)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile atomically (temporary file, then rename)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read and validate a profile file; a bad file raises :class:`ProfileError`."""
        doc = load_json(path, ProfileError, "profile")
        return cls.from_dict(doc, f"profile {os.fspath(path)}")


def _times(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _with_estimated_split(layer: LayerProfile) -> LayerProfile:
    b, w = layer.estimated_split_ms()
    return dataclasses.replace(layer, backward_input_ms=b, backward_weight_ms=w)


def graph_hash(layers: Iterable[tuple[str, str, Sequence[int]]]) -> str:
    """A short stable hash of a layer graph from ``(name, op, inputs)`` triples.

    The runtime recomputes it from the model it rebuilds to check the model matches the plan.
    """
    digest = hashlib.sha256()
    for name, op, inputs in layers:
        digest.update(json.dumps([name, op, list(inputs)]).encode())
    return digest.hexdigest()[:16]
