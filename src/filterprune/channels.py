"""The books of a channel graph: channel ids, which of them must go together, and the slots and
groups that come out. Nothing here knows how a model was traced; graph.py feeds it.

Every channel gets an integer id. Ids that can only be removed together are united (a union-find);
id 0 (PINNED) is never removed, and whatever is united with it stays. A *slot* is one axis of one
layer's tensors with the id of each index; once all ids are united, each root is one removable
unit, and units touching the same slots form a group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PINNED = 0


@dataclass
class Slot:
    """One axis of one layer, with the channel id of each of its indices.

    role is "out" (the output rows of a conv or Linear), "in" (the input columns of a conv or
    Linear), "channel" (a per-channel layer: a norm, a depthwise conv, a PReLU) or "param" (a bare
    parameter such as a layer scale: `param` is its attribute on `module`, `dim` the axis cut).
    """

    module: str
    role: str
    labels: torch.Tensor
    macs_per_index: float = 0.0
    param: str | None = None
    dim: int = 0
    owner: torch.Tensor = field(default=None, repr=False)  # unit index per position, -1 if pinned
    spread: torch.Tensor = field(default=None, repr=False)  # 1 / copies of the same feature map
    # False where removing a channel changes what the layer computes for the channels that stay
    # (a LayerNorm across channels, a weight-standardised conv's inputs): the pruner can then
    # only check that the model still runs.
    exact: bool = True

    @property
    def name(self) -> str:
        """The layer's qualified name, or the bare parameter's."""
        return f"{self.module}.{self.param}" if self.param else self.module

    @property
    def key(self) -> tuple[str, str, str | None]:
        return self.module, self.role, self.param


@dataclass
class Group:
    """Channels that are removed together: one unit removes the same channel from every member."""

    name: str
    members: list[str]  # "layer:role" of every slot, for people to read
    size: int
    offset: int  # index of this group's first unit in the pruner's flat list of units
    slots: list[Slot] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return f"Group({self.name!r}, size={self.size}, members={len(self.members)})"


class UnionFind:
    """Channel ids and the sets they were united into; id 0 is PINNED and stays the root of its set."""

    def __init__(self) -> None:
        self.parent: list[int] = [PINNED]

    def fresh(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            low, high = min(ra, rb), max(ra, rb)  # keeps PINNED the root of whatever it joins
            self.parent[high] = low

    def unite(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        differ = a != b
        if differ.any():
            # One int64 per pair makes the de-duplication a fast 1-D unique (ids are < 2**31).
            pairs = torch.unique(a[differ] * 2**31 + b[differ])
            for pair in pairs.tolist():
                self.union(pair >> 31, pair & (2**31 - 1))

    def pin(self, labels: torch.Tensor) -> None:
        self.unite(labels, torch.zeros((), dtype=torch.long))

    def roots(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.find(x) for x in labels.tolist()], dtype=torch.long)


class Books:
    """Slots and united ids as the label run finds them; `finish()` turns them into groups."""

    def __init__(self) -> None:
        self.uf = UnionFind()
        self.slots: dict[tuple, Slot] = {}

    def add_slot(self, slot: Slot) -> torch.Tensor:
        """Record a slot; a layer called twice shares its channels, so unite both calls' ids."""
        known = self.slots.get(slot.key)
        if known is not None:
            self.uf.unite(known.labels, slot.labels)
            known.exact &= slot.exact
            return known.labels
        slot.labels = slot.labels.clone()
        self.slots[slot.key] = slot
        return slot.labels

    def finish(self) -> tuple[list[Group], int]:
        """Fill every slot's owner and spread; return the groups (in trace order) and the unit count."""
        find = self.uf.find
        pinned = find(PINNED)
        slots = list(self.slots.values())
        members_of: dict[int, set[int]] = {}
        for i, slot in enumerate(slots):
            # Entries that share an id before uniting are copies of one feature map (the spatial
            # positions a flatten spread out); criteria average over those and sum over the rest.
            _, inverse, counts = torch.unique(slot.labels, return_inverse=True, return_counts=True)
            slot.spread = 1.0 / counts[inverse].double()
            slot.labels = self.uf.roots(slot.labels)
            for root in set(slot.labels.tolist()) - {pinned}:
                members_of.setdefault(root, set()).add(i)
        by_members: dict[tuple[int, ...], list[int]] = {}
        for root, members in members_of.items():
            by_members.setdefault(tuple(sorted(members)), []).append(root)
        groups: list[Group] = []
        unit_of: dict[int, int] = {}
        for members in sorted(by_members):  # slot indices are in trace order; so are the groups
            roots = sorted(by_members[members])
            group_slots = [slots[i] for i in members]
            first = next((s for s in group_slots if s.role == "out"), group_slots[0])
            groups.append(Group(first.name, [f"{s.name}:{s.role}" for s in group_slots], len(roots), len(unit_of),
                                group_slots))
            for root in roots:
                unit_of[root] = len(unit_of)
        for slot in slots:
            slot.owner = torch.tensor([unit_of.get(r, -1) for r in slot.labels.tolist()], dtype=torch.long)
        return groups, len(unit_of)
