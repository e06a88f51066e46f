"""Local refinement of a plan found on a thinned state space: its boundaries, moved finely.

Above :data:`~planner.optimize.states.MAX_STATES` states the DP's space is thinned to about one
state per ``1/400`` of the work (:mod:`planner.optimize.states`, step 6), which spaces stage
boundaries too coarsely when a plan has many stages (NASNet-like cells on 64 devices: about 26).
The states dropped by thinning are kept in :attr:`~planner.optimize.states.StateSpace.pool`.

:func:`band_space` builds, around each boundary of a plan, a *band*: the pool states whose work
lies within a few thinned windows of it. Its ``includes`` lets a stage run from one band to the
next or the one after (so two stages may merge), never backwards, so the space is small (bands
times their width) and the DP over it is quick. The plan itself is in that space, so the DP's
answer there is never worse; :func:`refine` repeats this around the new boundaries until nothing
improves. The result is no longer "the optimum of one space"; the certificate
(:mod:`planner.optimize.bounds`) still bounds it against every partition.

Example:
    >>> import numpy as np
    >>> from planner.optimize.synthetic import nasnet_profile
    >>> from planner.optimize.states import build_states
    >>> space = build_states(nasnet_profile(cells=12, seed=1))
    >>> space.pool is not None and len(space.pool) > len(space)
    True
    >>> compute = np.array([la.compute_ms for la in nasnet_profile(cells=12, seed=1).layers])
    >>> bands = band_space(space, [space.masks[len(space) // 2]], compute)
    >>> bool(bands.includes[0, -1]), len(bands) > 3  # one boundary: one stage or two
    (True, True)
"""

from __future__ import annotations

import numpy as np

from planner.optimize.states import StateSpace

__all__ = ["NARROW", "WIDE", "band_space"]

#: Bands as (thinned windows of work on each side of the boundary, pool states at most, the
#: closest in work). Wide bands find the better plans when there are many stages (NASNet-like
#: on 8x8, ``pipedream``: 1.89% from the bound, narrow 2.34%); with few stages (``1f1b``/``gpipe``)
#: narrow ones reach the same plans at a fifth of the cost (8x8: 2.7 s against 14 s).
WIDE = (12.0, 128)
NARROW = (6.0, 48)


def band_space(
    space: StateSpace,
    boundaries: list[np.ndarray],
    compute: np.ndarray,
    band: tuple[float, int] = WIDE,
) -> StateSpace:
    """The bands around ``boundaries`` (downset masks, in pipeline order) as a state space.

    Args:
        space: A thinned space (``space.pool`` set).
        boundaries: The masks of a plan's inner boundaries ``D_1 .. D_{S-1}``.
        compute: Compute per layer (any unit), to measure where a state lies.
        band: Its width in thinned windows each side, and its most states (:data:`WIDE`).

    Returns:
        States ``∅``, band 1, ..., band ``S - 1``, all layers; ``includes[k, j]`` iff ``D_k ⊊ D_j``
        and ``j``'s band is one or two after ``k``'s. Each band holds its boundary.
    """
    pool = space.pool if space.pool is not None else space.masks
    work = pool.astype(float) @ compute
    total = float(compute.sum())
    windows, most = band
    width = windows * total / max(len(space), 1)
    n = space.masks.shape[1]
    masks = [np.zeros(n, dtype=bool)]
    band_of = [0]
    for s, mask in enumerate(boundaries, start=1):
        here = float(mask.astype(float) @ compute)
        near = np.flatnonzero(np.abs(work - here) <= width)
        near = near[np.argsort(np.abs(work[near] - here), kind="stable")][:most]
        chosen = [mask, *(pool[i] for i in near)]
        unique = {m.tobytes(): m for m in chosen if m.any() and not m.all()}
        masks.extend(unique.values())
        band_of.extend([s] * len(unique))
    masks.append(np.ones(n, dtype=bool))
    band_of.append(len(boundaries) + 1)
    stacked = np.stack(masks)
    bands = np.array(band_of)
    step = bands[None, :] - bands[:, None]
    m = stacked.astype(np.float32)
    subset = (m @ (1.0 - m).T) == 0  # D_k ⊆ D_j
    includes = subset & ((step == 1) | (step == 2)) & (stacked.sum(1)[:, None] < stacked.sum(1))
    stacked.setflags(write=False)
    includes.setflags(write=False)
    return StateSpace(masks=stacked, includes=includes, kind=space.kind)
