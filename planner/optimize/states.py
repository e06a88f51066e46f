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
   PipeDream's there, and equal to a DP over all downsets.
3. **Bounded inside branchy segments.** A segment above that cap keeps the prefixes of a few
   topological orders of the segment: the profile's order and two depth-first orders (branches
   in index order and reversed, each branch finished before the next starts). A depth-first
   order's prefixes cut one branch at a time, with the other branches done or not started: the
   cheap cuts. So an Inception block costs a few times its layer count, not the product of its
   branch lengths.
4. **A global budget.** While the total exceeds ``max(1.25 n, 1024)`` states, the segment whose
   next leaner tier saves the most states is downgraded (lattice, then a few orders, then the
   profile's order alone). The DP's time grows with the square of the states, so this keeps
   large graphs fast; small ones (all of PipeDream's profiles) keep their whole lattices.

Every tier contains the prefixes of the profile's order, so the DP is never worse than the
one-order DP. States are sorted by size; ``includes[k, j]`` says ``D_k ⊊ D_j``, i.e. a stage may run from ``k`` to ``j``.

Other kinds: ``profile`` (prefixes of the profile's order), ``orders`` (step 3 everywhere),
``all`` (every downset; small graphs), ``antichain`` (PipeDream's antichain DAG, for the
PipeDream-compatible cost model).

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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from planner.errors import PlanError
from planner.profile.format import Profile

__all__ = ["STATE_KINDS", "StateSpace", "build_states"]

STATE_KINDS = ("auto", "orders", "profile", "all", "antichain")
_ALL_DOWNSETS_LIMIT = 200_000


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
    """

    masks: np.ndarray
    includes: np.ndarray
    kind: str
    frontier_bytes: np.ndarray | None = None

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
        )


# --- graph helpers (bitsets as Python ints: fast enough for thousands of layers) ----------------


class _Graph:
    def __init__(self, profile: Profile) -> None:
        self.n = n = len(profile.layers)
        self.inputs = [tuple(sorted(set(la.inputs))) for la in profile.layers]
        self.output_bytes = [float(la.activation_bytes) for la in profile.layers]
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
    """The state space of ``kind`` for a profile (module docstring).

    Raises:
        PlanError: Unknown kind, or ``all`` on a graph with more than 200,000 downsets.
    """
    if kind not in STATE_KINDS:
        raise PlanError(f"unknown state space {kind!r}; use one of {', '.join(STATE_KINDS)}")
    graph = _Graph(profile)
    n = graph.n
    if kind == "antichain":
        return _antichain_states(graph)
    if kind == "profile":
        masks = np.tri(n + 1, n, -1, dtype=bool)
        return StateSpace(
            masks=masks, includes=np.triu(np.ones((n + 1, n + 1), bool), 1), kind=kind
        )
    if kind == "all":
        found = _local_downsets(graph, list(range(n)), _ALL_DOWNSETS_LIMIT)
        if found is None:
            raise PlanError(
                f"{profile.model!r} has more than {_ALL_DOWNSETS_LIMIT} downsets; use the state "
                "space 'auto'"
            )
        return _from_bitsets(graph, [0, *found], kind)
    segments = _segments(graph)
    # layers before each segment: a segment's nodes are contiguous in the profile's order and
    # every earlier layer is an ancestor of the separator that closes the previous segment
    cap_of = [max(64, 32 * len(seg)) for seg in segments]
    local: list[list[int] | None] = [
        _local_downsets(graph, seg, cap) if kind == "auto" and len(seg) > 1 else None
        for seg, cap in zip(segments, cap_of, strict=True)
    ]
    # per segment, from richest to leanest: its lattice, a few orders' prefixes, its own order's
    tiers = [
        [x for x in (lattice, _order_prefixes(graph, seg), _profile_prefixes(seg)) if x is not None]
        for lattice, seg in zip(local, segments, strict=True)
    ]
    level = [0] * len(segments)
    budget = max(n + n // 4, 1024)
    sizes = [len(t[0]) for t in tiers]
    total = sum(sizes)
    while total > budget:
        # downgrade the segment whose next tier saves the most states
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
    bitsets, seg_of = [0], [-1]
    base = 0
    for s, seg in enumerate(segments):
        chosen = tiers[s][level[s]]
        bitsets.extend(base | x for x in chosen)
        seg_of.extend([s] * len(chosen))
        for v in seg:
            base |= 1 << v
    return _from_bitsets(graph, bitsets, kind, seg_of)


def _from_bitsets(
    graph: _Graph, bitsets: Iterable[int], kind: str, segment_of: Sequence[int] | None = None
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
    return StateSpace(masks=masks, includes=includes, kind=kind)


def _antichain_states(graph: _Graph) -> StateSpace:
    """PipeDream's antichain DAG (graph.py ``antichain_dag``), re-derived; plus the empty root.

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
