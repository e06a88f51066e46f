"""The DP's state space: which down-closed layer sets may end a prefix of the pipeline.

A partition into stages in a topological order is a chain of downsets ``∅ = D_0 ⊂ D_1 ⊂ ... ⊂
D_S = all layers`` (stage ``s`` is ``D_s \\ D_{s-1}``). A DP over "the first ``j`` layers" of one
topological order only sees the ``n + 1`` prefixes of that order, which misses good cuts on
branched graphs: on PipeDream's ResNet-50 profile at 8 GPUs the best partition cuts a downsample
block through *both* of its branches (main branch up to its second ReLU, shortcut conv done), a
downset no single order reaches (0.05658 s vs 0.05592 s per stage). PipeDream enumerates every
antichain (equivalently every downset), which explodes on Inception-like graphs: the downsets of a
block with ``b`` parallel branches of lengths ``L_i`` number ``prod(L_i + 1)``, and of ``k`` such
blocks side by side the product of those.

Our design, ``auto`` (:func:`build_states`):

1. **Separators.** A layer comparable with every other layer (an ancestor or descendant of each:
   the join after a residual block, the concat after an Inception block, every layer of a plain
   chain) is a separator. Every downset either lies before a separator or contains it and all its
   ancestors. So the downsets of the whole graph are the union, not the product, over the
   *segments* between consecutive separators of ``(everything before the segment) ∪ (a downset of
   the segment)``. The count adds up over blocks instead of multiplying.
2. **Exact inside small segments.** For each segment we enumerate all of its downsets when they
   number at most ``max(64, 32 x segment size)``. This covers every downset PipeDream's antichain
   DAG can reach on its profiles (ResNet, VGG, GNMT, AlexNet), so the DP is at least as good as
   PipeDream's there, and equal to a DP over all downsets: the space is then ``complete``.
3. **Waists inside large segments.** A segment above that cap is cut at its *waists*: positions
   of the profile's order crossed by at most :data:`WAIST` (2) tensors. NASNet-like graphs have no
   separators at all (a cell reads the two cells before it), so without this the whole model is
   one segment; its cell boundaries are waists. The same union argument holds for any cut
   positions of a topological order (a piece's downsets plus everything before it are downsets),
   so each piece is then treated as a segment: its lattice when small, else step 4. Downsets straddling a waist are left out:
   they cut three or more tensors where a waist cuts two.
4. **Bounded inside branchy pieces.** A piece above the cap keeps the prefixes of a few
   topological orders of it: the profile's order and two depth-first orders (branches
   in index order and reversed, each branch finished before the next starts). A depth-first
   order's prefixes cut one branch at a time, with the other branches done or not started: the
   cheap cuts. So an Inception block costs a few times its layer count, not the product of its
   branch lengths.
5. **A global budget.** While the total exceeds ``max(1.25 n, 1024)`` states, the piece whose
   next leaner tier saves the most states is downgraded (lattice, then a few orders, then the
   profile's order alone).
6. **Thinning.** The DP's time grows with the square of the states, so above
   :data:`MAX_STATES` (600) states the space is thinned to about :data:`THINNED_STATES` (400):
   every piece's end is kept, and the rest is cut into equal windows of compute already done,
   each keeping its state with the fewest bytes crossing the cut. Stages can still be balanced to
   about 1/400 of the work and boundaries stay cheap; what this loses is certified by the lower
   bound of :mod:`planner.optimize.bounds` (the plan's ``gap``).

Why this design: branchy CNNs are series of blocks with narrow boundaries (1-2 tensors) and
wide interiors; good stage boundaries are at or near the narrow places, and balance needs
boundaries every small fraction of the work. Exact lattices where they are small keep the small
graphs (all of PipeDream's profiles) exact; waists and depth-first orders give the cheap cuts
inside; thinning keeps the DP's quadratic cost fixed however large the graph. Measured (states,
build time): inception_v3 220 (0.2 s), googlenet 189 (0.2 s), NASNet-like 1,695 layers 366
(0.7 s); PipeDream's antichain DAG has 327k states on googlenet.

Up to step 5 every tier contains the prefixes of the profile's order, so the DP is never worse
than the one-order DP; thinning (only above 600 states) gives that up for speed. States are
sorted by size; ``includes[k, j]`` says ``D_k ⊊ D_j``, i.e. a stage may run from ``k`` to ``j``.
:attr:`StateSpace.complete` (added, default False: the API is otherwise unchanged) says every
downset is a state. Spaces are cached per graph (the DP, the feasibility check and the
certificate ask for the same one).

Other kinds: ``profile`` (prefixes of the profile's order), ``orders`` (step 4 everywhere),
``all`` (every downset; small graphs), ``antichain`` (PipeDream's antichain DAG, for the
PipeDream-compatible cost model). When the antichain DAG has more than 3,000 states (it has
hundreds of thousands on Inception-like graphs, where PipeDream's own optimizer runs out of
memory) ``antichain`` returns the ``auto`` space with kind ``"antichain-bounded"``: PipeDream's
formulas over a space that scales.

Example:
    >>> from planner.profile import LayerProfile, Profile
    >>> def L(name, inputs=()):
    ...     return LayerProfile(name=name, op="", forward_ms=1, backward_ms=1, output_bytes=(4,),
    ...                         parameter_bytes=0, inputs=inputs)
    >>> # a -> (b -> c, d) -> e: a residual-like block
    >>> p = Profile(model="block", batch_size=1,
    ...             layers=(L("a"), L("b", (0,)), L("c", (1,)), L("d", (0,)), L("e", (2, 3))))
    >>> space = build_states(p)
    >>> len(space), len(build_states(p, "profile"))  # all 8 downsets vs 6 prefixes
    (8, 6)
    >>> space.layers(3).tolist()
    [0, 3]
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from planner.errors import PlanError
from planner.profile.format import Profile

__all__ = ["STATE_KINDS", "StateSpace", "build_states"]

STATE_KINDS = ("auto", "orders", "profile", "all", "antichain")
_ALL_DOWNSETS_LIMIT = 200_000
#: Above this many states the ``auto``/``orders`` space is thinned to :data:`THINNED_STATES`.
MAX_STATES = 600
THINNED_STATES = 400
#: A waist is a position of the profile's order crossed by at most this many tensors.
WAIST = 2
_LATTICE_MAX_LAYERS = 400
#: PipeDream's antichain DAG is abandoned (for the bounded space) beyond this many states.
_ANTICHAIN_LIMIT = 3_000


@dataclass(frozen=True, kw_only=True)
class StateSpace:
    """Downsets a pipeline prefix may end at, with the relation "may follow".

    Attributes:
        masks: ``states x layers`` booleans; row 0 is the empty set, the last row every layer;
            rows sorted by size.
        includes: ``states x states`` booleans, ``includes[k, j]`` iff ``D_k ⊊ D_j`` (and, for the
            antichain kind, ``k`` precedes ``j`` in PipeDream's antichain DAG).
        kind: How the states were built (one of :data:`STATE_KINDS`).
        frontier_bytes: For the antichain kind, PipeDream's ``output_activation_size`` of each
            state (activation bytes of its augmented antichain); else None.
        complete: Every downset of the graph is a state, so a DP exact over the space is
            optimal over every partition (added later; False by default, safe for old callers).
        pool: For a thinned space, the masks of every state before thinning (what
            :mod:`planner.optimize.refine` moves a plan's boundaries among); else None.
    """

    masks: np.ndarray
    includes: np.ndarray
    kind: str
    frontier_bytes: np.ndarray | None = None
    complete: bool = False
    pool: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.masks)

    def layers(self, state: int) -> np.ndarray:
        """Layer indices of downset ``state``."""
        return np.flatnonzero(self.masks[state])

    def stage(self, start: int, end: int) -> np.ndarray:
        """Layer indices of the stage from state ``start`` to state ``end``."""
        return np.flatnonzero(self.masks[end] & ~self.masks[start])

    def subset(self, keep: Sequence[int] | np.ndarray) -> StateSpace:
        """The space restricted to some states (the first and last are always kept)."""
        idx = np.unique(np.concatenate([[0, len(self) - 1], np.asarray(keep, dtype=int)]))
        fb = None if self.frontier_bytes is None else self.frontier_bytes[idx]
        return StateSpace(
            masks=self.masks[idx],
            includes=self.includes[np.ix_(idx, idx)],
            kind=self.kind,
            frontier_bytes=fb,
            complete=self.complete and len(idx) == len(self),
        )


# --- graph helpers (bitsets as Python ints: fast enough for thousands of layers) ----------------


class _Graph:
    def __init__(self, profile: Profile) -> None:
        self.n = n = len(profile.layers)
        self.inputs = [tuple(sorted(set(la.inputs))) for la in profile.layers]
        self.output_bytes = [float(la.activation_bytes) for la in profile.layers]
        self.compute = [float(la.compute_ms) for la in profile.layers]
        self.succ: list[list[int]] = [[] for _ in range(n)]
        for i, ins in enumerate(self.inputs):
            for s in ins:
                self.succ[s].append(i)
        self.anc = [0] * n  # strict ancestors
        for i, ins in enumerate(self.inputs):
            bits = 0
            for s in ins:
                bits |= self.anc[s] | (1 << s)
            self.anc[i] = bits
        self.desc = [0] * n  # strict descendants
        for i in range(n - 1, -1, -1):
            bits = 0
            for c in self.succ[i]:
                bits |= self.desc[c] | (1 << c)
            self.desc[i] = bits

    def dfs_order(self, nodes: Sequence[int], reverse: bool) -> list[int]:
        """Reverse postorder of a DFS over the sub-DAG on ``nodes``: branches one at a time."""
        inside = set(nodes)
        seen: set[int] = set()
        post: list[int] = []
        roots = [v for v in nodes if not any(s in inside for s in self.inputs[v])]
        for root in reversed(roots) if not reverse else roots:
            if root in seen:
                continue
            seen.add(root)
            stack = [(root, iter(self._children(root, inside, reverse)))]
            while stack:
                v, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    post.append(v)
                    stack.pop()
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, iter(self._children(nxt, inside, reverse))))
        return post[::-1]

    def _children(self, v: int, inside: set[int], reverse: bool) -> list[int]:
        return sorted((c for c in self.succ[v] if c in inside), reverse=reverse)


def _bits_to_mask(bits: int, n: int) -> np.ndarray:
    raw = np.frombuffer(bits.to_bytes((n + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].astype(bool)


def _local_downsets(graph: _Graph, nodes: Sequence[int], cap: int) -> list[int] | None:
    """All nonempty downsets of the sub-DAG on ``nodes`` as bitsets, or None if more than ``cap``."""
    inside = 0
    for v in nodes:
        inside |= 1 << v
    need = {v: sum(1 << s for s in graph.inputs[v] if (inside >> s) & 1) for v in nodes}
    found = {0}
    frontier = [0]
    while frontier:
        nxt = []
        for d in frontier:
            for v in nodes:
                if not (d >> v) & 1 and need[v] & ~d == 0:
                    e = d | (1 << v)
                    if e not in found:
                        found.add(e)
                        nxt.append(e)
                        if len(found) > cap + 1:
                            return None
        frontier = nxt
    found.discard(0)
    return sorted(found, key=lambda b: (b.bit_count(), b))


def _order_prefixes(graph: _Graph, nodes: Sequence[int]) -> list[int]:
    out: set[int] = set()
    for order in (list(nodes), graph.dfs_order(nodes, False), graph.dfs_order(nodes, True)):
        bits = 0
        for v in order:
            bits |= 1 << v
            out.add(bits)
    return sorted(out, key=lambda b: (b.bit_count(), b))


def _profile_prefixes(nodes: Sequence[int]) -> list[int]:
    bits, out = 0, []
    for v in nodes:
        bits |= 1 << v
        out.append(bits)
    return out


def _segments(graph: _Graph) -> list[list[int]]:
    """Layers split at separators (layers comparable with all others), in topological order."""
    n = graph.n
    everything = (1 << n) - 1
    separators = [v for v in range(n) if graph.anc[v] | graph.desc[v] | (1 << v) == everything]
    segments, start = [], 0
    for s in separators:
        segments.append(list(range(start, s + 1)))
        start = s + 1
    if start < n:
        segments.append(list(range(start, n)))
    return segments


# --- builders ------------------------------------------------------------------------------------


def build_states(profile: Profile, kind: str = "auto") -> StateSpace:
    """The state space of ``kind`` for a profile (module docstring); cached per graph.

    Raises:
        PlanError: Unknown kind, or ``all`` on a graph with more than 200,000 downsets.
    """
    if kind not in STATE_KINDS:
        raise PlanError(f"unknown state space {kind!r}; use one of {', '.join(STATE_KINDS)}")
    key = (
        kind,
        tuple(tuple(la.inputs) for la in profile.layers),
        tuple(la.activation_bytes for la in profile.layers),
        tuple(la.compute_ms for la in profile.layers),
    )
    cached = _CACHE.get(key)
    if cached is None:
        cached = _build(profile, kind)
        _CACHE[key] = cached
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
    return cached


_CACHE: dict[tuple, StateSpace] = {}
_CACHE_SIZE = 8


def _build(profile: Profile, kind: str) -> StateSpace:
    graph = _Graph(profile)
    n = graph.n
    if kind == "antichain":
        space = _antichain_states(graph, _ANTICHAIN_LIMIT)
        if space is not None:
            return space
        # PipeDream's space explodes here: search the bounded space with PipeDream's formulas
        return dataclasses.replace(_build(profile, "auto"), kind="antichain-bounded")
    if kind == "profile":
        masks = np.tri(n + 1, n, -1, dtype=bool)
        return StateSpace(
            masks=masks,
            includes=np.triu(np.ones((n + 1, n + 1), bool), 1),
            kind=kind,
            complete=_is_chain(graph),
        )
    if kind == "all":
        found = _local_downsets(graph, list(range(n)), _ALL_DOWNSETS_LIMIT)
        if found is None:
            raise PlanError(
                f"{profile.model!r} has more than {_ALL_DOWNSETS_LIMIT} downsets; use the state "
                "space 'auto'"
            )
        return _from_bitsets(graph, [0, *found], kind, complete=True)
    pieces = _pieces(graph, exact=kind == "auto")
    # per piece, from richest to leanest: its lattice, a few orders' prefixes, its own order's
    tiers = [
        [x for x in (lattice, _order_prefixes(graph, seg), _profile_prefixes(seg)) if x is not None]
        for seg, lattice, _ in pieces
    ]
    level = [0] * len(pieces)
    budget = max(n + n // 4, 1024)
    sizes = [len(t[0]) for t in tiers]
    total = sum(sizes)
    while total > budget:
        # downgrade the piece whose next tier saves the most states
        s = max(
            (i for i in range(len(tiers)) if level[i] + 1 < len(tiers[i])),
            key=lambda i: sizes[i] - len(tiers[i][level[i] + 1]),
            default=None,
        )
        if s is None:
            break
        level[s] += 1
        total += len(tiers[s][level[s]]) - sizes[s]
        sizes[s] = len(tiers[s][level[s]])
    complete = all(
        separator_cut and (len(seg) == 1 or (lattice is not None and level[i] == 0))
        for i, (seg, lattice, separator_cut) in enumerate(pieces)
    )
    bitsets, seg_of, ends = [0], [-1], [0]
    base = 0
    for s, (seg, _, _) in enumerate(pieces):
        chosen = tiers[s][level[s]]
        bitsets.extend(base | x for x in chosen)
        seg_of.extend([s] * len(chosen))
        for v in seg:
            base |= 1 << v
        ends.append(base)
    pool: list[int] | None = None
    if len(bitsets) > MAX_STATES:
        pool = bitsets
        bitsets, seg_of = _thin(graph, bitsets, seg_of, set(ends), THINNED_STATES)
        complete = False
    space = _from_bitsets(graph, bitsets, kind, seg_of, complete=complete)
    if pool is None:
        return space
    masks = np.stack([_bits_to_mask(b, n) for b in pool])
    masks.setflags(write=False)
    return dataclasses.replace(space, pool=masks)


def _is_chain(graph: _Graph) -> bool:
    """Every layer comparable with every other: the profile's prefixes are all the downsets."""
    everything = (1 << graph.n) - 1
    return all(graph.anc[v] | graph.desc[v] | (1 << v) == everything for v in range(graph.n))


def _open_counts(graph: _Graph) -> np.ndarray:
    """``open[p]``: layers before position ``p`` of the profile's order read at ``p`` or later."""
    n = graph.n
    diff = np.zeros(n + 2, dtype=np.int64)
    for v in range(n):
        if graph.succ[v]:
            last = max(graph.succ[v])
            diff[v + 1] += 1
            diff[last + 1] -= 1
    return np.cumsum(diff)[: n + 1]


def _pieces(graph: _Graph, *, exact: bool) -> list[tuple[list[int], list[int] | None, bool]]:
    """``(layers, lattice or None, cut at a separator)`` per piece, in the profile's order.

    Segments between separators keep their lattice when it has at most ``max(64, 32 x size)``
    downsets. A larger one is split at its *waists*: positions of the profile's order where at
    most :data:`WAIST` tensors cross (NASNet's cell boundaries carry the last two cells' outputs),
    and each piece is treated alike. Downsets that straddle a waist are then left out.
    """
    opened = _open_counts(graph)
    out: list[tuple[list[int], list[int] | None, bool]] = []
    for seg in _segments(graph):
        lattice = _lattice(graph, seg) if exact else None
        if lattice is not None or len(seg) == 1:
            out.append((seg, lattice, True))
            continue
        cuts = [p for p in seg[1:] if opened[p] <= WAIST]
        if not cuts:
            out.append((seg, None, True))
            continue
        bounds = [seg[0], *cuts, seg[-1] + 1]
        for lo, hi in itertools.pairwise(bounds):
            part = list(range(lo, hi))
            out.append((part, _lattice(graph, part) if exact else None, False))
    return out


def _lattice(graph: _Graph, seg: Sequence[int]) -> list[int] | None:
    if len(seg) < 2 or len(seg) > _LATTICE_MAX_LAYERS:
        return None
    return _local_downsets(graph, seg, max(64, 32 * len(seg)))


def _thin(
    graph: _Graph, bitsets: list[int], seg_of: list[int], keep: set[int], target: int
) -> tuple[list[int], list[int]]:
    """At most about ``target`` states: the piece ends, then per window of work the lightest cut.

    The compute already done (``work``) orders the states; the range is cut into equal windows
    and each keeps its state with the fewest bytes crossing the cut (ties: the least work), so
    stages can still be balanced to about ``total work / target`` and their links stay cheap.
    """
    n = graph.n
    masks = np.stack([_bits_to_mask(b, n) for b in bitsets])
    compute = np.array(graph.compute)
    work = masks @ compute
    cut = _cut_bytes(graph, masks)
    chosen = {i for i, b in enumerate(bitsets) if b in keep}
    room = max(target - len(chosen), 1)
    total = float(work[-1]) if len(work) else 0.0
    window = np.minimum((work / total * room).astype(int), room - 1) if total > 0 else work * 0
    for w in np.unique(window):
        idx = np.flatnonzero(window == w)
        chosen.add(int(idx[np.lexsort((work[idx], cut[idx]))[0]]))
    order = sorted(chosen)
    return [bitsets[i] for i in order], [seg_of[i] for i in order]


def _cut_bytes(graph: _Graph, masks: np.ndarray) -> np.ndarray:
    """Bytes of the tensors leaving each downset (each producer counted once)."""
    src = np.array([v for v in range(graph.n) for _ in graph.succ[v]], dtype=np.int64)
    dst = np.array([c for v in range(graph.n) for c in graph.succ[v]], dtype=np.int64)
    out = np.zeros(len(masks))
    if not len(src):
        return out
    leaving = masks[:, src] & ~masks[:, dst]  # (states, edges), edges grouped by producer
    starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
    per_producer = np.logical_or.reduceat(leaving, starts, axis=1)
    sizes = np.array(graph.output_bytes)[src[starts]]
    return per_producer.astype(float) @ sizes


def _from_bitsets(
    graph: _Graph,
    bitsets: Iterable[int],
    kind: str,
    segment_of: Sequence[int] | None = None,
    *,
    complete: bool = False,
) -> StateSpace:
    items = list(bitsets)
    segs = list(segment_of) if segment_of is not None else [0] * len(items)
    unique = dict(zip(items, segs, strict=True))  # dedupe, keep the first segment seen
    items = sorted(unique, key=lambda b: (b.bit_count(), b))
    masks = np.stack([_bits_to_mask(b, graph.n) for b in items])
    seg = np.array([unique[b] for b in items])
    # different segments: the earlier one is contained; same segment: compare the layers the
    # segment's states differ in (small matrices, not states x layers)
    includes = seg[:, None] < seg[None, :]
    for s in np.unique(seg):
        idx = np.flatnonzero(seg == s)
        local = masks[idx]
        cols = np.flatnonzero(local.any(axis=0) & ~local.all(axis=0))
        part = local[:, cols].astype(np.float32)
        includes[np.ix_(idx, idx)] = (part @ (1.0 - part).T) == 0
    np.fill_diagonal(includes, False)
    if masks.sum(1)[-1] != graph.n or masks[0].any():
        raise AssertionError("state space must run from the empty set to every layer")
    masks.setflags(write=False)
    includes.setflags(write=False)
    return StateSpace(masks=masks, includes=includes, kind=kind, complete=complete)


def _antichain_states(graph: _Graph, limit: int) -> StateSpace | None:
    """PipeDream's antichain DAG (graph.py ``antichain_dag``), re-derived; plus the empty root.

    None when it has more than ``limit`` states (Inception-like graphs have hundreds of
    thousands; PipeDream's own optimizer runs out of memory there).

    Starting from the first source, a state's antichain is *augmented* with every ancestor that
    still feeds a layer outside that antichain member's ancestors; a next state replaces one
    augmented member by one of its consumers none of whose descendants is in the augmented set,
    then keeps only the maximal members. A stage may run from state ``k`` to ``j`` when ``k``
    precedes ``j`` in this DAG (its ``all_predecessor_ids``).
    """
    n = graph.n
    all_ids = range(n)

    def augment(antichain: frozenset[int]) -> frozenset[int]:
        extra = set()
        for a in antichain:
            pa = graph.anc[a]
            for p in all_ids:
                if (pa >> p) & 1 and any(not (pa >> o) & 1 and o != a for o in graph.succ[p]):
                    extra.add(p)
        return frozenset(extra) | antichain

    def maximal(members: frozenset[int]) -> frozenset[int]:
        return frozenset(a for a in members if not any((graph.desc[a] >> b) & 1 for b in members))

    source = next(i for i in all_ids if not graph.inputs[i])
    start = frozenset([source])
    index = {start: 0}
    states = [start]
    edges: list[tuple[int, int]] = []
    queue = [start]
    expanded: set[frozenset[int]] = set()
    while queue:
        antichain = queue.pop(0)
        if antichain in expanded:
            continue
        expanded.add(antichain)
        aug = augment(antichain)
        aug_bits = sum(1 << a for a in aug)
        for u in aug:
            for v in graph.succ[u]:
                if v in antichain or graph.desc[v] & aug_bits:
                    continue
                nxt = maximal((aug - {u}) | {v})
                if nxt not in index:
                    index[nxt] = len(states)
                    states.append(nxt)
                    if len(states) > limit:
                        return None
                edges.append((index[antichain], index[nxt]))
                queue.append(nxt)
    count = len(states)
    downsets: list[int] = []
    frontier: list[list[int]] = []
    for antichain in states:
        aug = augment(antichain)
        bits = 0
        for a in aug:
            bits |= graph.anc[a] | (1 << a)
        downsets.append(bits)
        frontier.append(sorted(aug))
    # ancestors in the antichain DAG (edges always grow the downset, so sort by size)
    order = sorted(range(count), key=lambda i: (downsets[i].bit_count(), downsets[i]))
    children: list[list[int]] = [[] for _ in range(count)]
    for a, b in edges:
        children[a].append(b)
    reach = np.zeros((count, count), dtype=bool)
    for a in reversed(order):
        for b in children[a]:
            reach[a, b] = True
            reach[a] |= reach[b]
    pos = np.empty(count, dtype=int)
    pos[order] = np.arange(count)
    includes = np.zeros((count + 1, count + 1), dtype=bool)
    includes[0, 1:] = True
    includes[1:, 1:] = reach[np.ix_(order, order)]
    masks = np.zeros((count + 1, n), dtype=bool)
    for row, i in enumerate(order, start=1):
        masks[row] = _bits_to_mask(downsets[i], n)
    if not masks[-1].all():
        raise PlanError(
            "PipeDream's antichain DAG does not end at the whole graph for this profile"
        )
    frontier_bytes = np.array(
        [0.0] + [sum(graph.output_bytes[a] for a in frontier[i]) for i in order]
    )
    for arr in (masks, includes, frontier_bytes):
        arr.setflags(write=False)
    return StateSpace(
        masks=masks, includes=includes, kind="antichain", frontier_bytes=frontier_bytes
    )
