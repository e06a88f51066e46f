"""Sums over families of downsets, for O(1) stage queries in the solvers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from planner.optimize.cost import CostModel

__all__ = ["DownsetTables"]


@dataclass(frozen=True, kw_only=True)
class DownsetTables:
    """Sums over a family of nested-or-not downsets, for O(1) stage queries.

    Row ``k`` describes downset ``D_k``; a stage between comparable downsets ``D_k ⊂ D_j`` is
    ``D_j \\ D_k`` and its sums are ``table[j] - table[k]`` (one subtraction, after an
    O(states x layers) precomputation). ``cut_bytes[k]`` is what the link after ``D_k`` carries.

    Example:
        >>> from planner.profile import LayerProfile, Profile
        >>> from planner.topology import Topology
        >>> from planner.optimize.cost import CostModel
        >>> L = lambda n, i: LayerProfile(name=n, op="", forward_ms=1, backward_ms=1,
        ...                               output_bytes=(10,), parameter_bytes=5, inputs=i)
        >>> p = Profile(model="skip", batch_size=1, layers=(L("a", ()), L("b", (0,)), L("c", (0, 1))))
        >>> t = DownsetTables.prefixes(CostModel(p, Topology.from_args(gpus=2)))
        >>> t.cut_bytes.tolist(), (t.compute_s[3] - t.compute_s[1]).item()
        ([0.0, 10.0, 20.0, 0.0], 0.004)
    """

    masks: np.ndarray
    compute_s: np.ndarray
    parameter_bytes: np.ndarray
    buffer_bytes: np.ndarray
    saved_bytes: np.ndarray
    output_bytes: np.ndarray
    cut_bytes: np.ndarray

    @classmethod
    def from_masks(cls, cost: CostModel, masks: np.ndarray) -> DownsetTables:
        """Tables for downsets given as a boolean matrix (states x layers)."""
        masks = np.ascontiguousarray(masks, dtype=bool)
        per_layer = np.stack(
            [
                cost.compute_s,
                cost.parameter_bytes,
                cost.buffer_bytes,
                cost.saved_bytes,
                cost.output_bytes,
            ],
            axis=1,
        )
        sums = masks.astype(float) @ per_layer  # one pass over the states x layers matrix
        cut = np.zeros(len(masks))
        src, dst = cost._edges()
        if len(src):
            # (state, producer) pairs whose tensor leaves the downset, each counted once
            rows, cols = np.nonzero(masks[:, src] & ~masks[:, dst])
            pairs = np.unique(rows * cost.num_layers + src[cols])
            np.add.at(cut, pairs // cost.num_layers, cost.output_bytes[pairs % cost.num_layers])
        tables = cls(
            masks=masks,
            compute_s=sums[:, 0].copy(),
            parameter_bytes=sums[:, 1].copy(),
            buffer_bytes=sums[:, 2].copy(),
            saved_bytes=sums[:, 3].copy(),
            output_bytes=sums[:, 4].copy(),
            cut_bytes=cut,
        )
        for value in (
            tables.compute_s,
            tables.parameter_bytes,
            tables.buffer_bytes,
            tables.saved_bytes,
            tables.output_bytes,
            tables.cut_bytes,
            masks,
        ):
            value.setflags(write=False)
        return tables

    @classmethod
    def prefixes(cls, cost: CostModel) -> DownsetTables:
        """The ``n + 1`` prefixes of the profile's own order (stage = contiguous range)."""
        n = cost.num_layers
        return cls.from_masks(cost, np.tri(n + 1, n, -1, dtype=bool))
