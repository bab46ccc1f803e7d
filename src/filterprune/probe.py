"""Check every group on the user's own model before offering it.

An exported graph has concrete sizes, so it cannot tell `x.view(b, x.size(1), -1)` from
`x.view(b, 512, -1)`: the first survives pruning, the second breaks. Instead of guessing, remove
one unit of every group at once (surgery.removed puts it back), run the model eagerly and compare
it with the unpruned model whose removed channels are zeroed. If that fails, bisect: the groups
that break or change the model alone are left out, each with the error. The same check covers any
op whose rule in graph_ops is wrong for the model at hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .channels import Group
from .surgery import removed
from .utils import dropped_indices

if TYPE_CHECKING:
    from .pruner import Pruner


def probe(pruner: "Pruner") -> None:
    """Leave out of `pruner.graph` the groups whose removal breaks or changes the model."""
    graph = pruner.graph
    candidates = [g for g in graph.groups if g.size > 1]  # a group of one cannot lose its last channel
    bad: list[tuple[Group, str]] = []
    while candidates:
        found = _failing(pruner, candidates, _error(pruner, candidates))
        if not found:
            break
        bad += found
        gone = {id(g) for g, _ in found}
        candidates = [g for g in candidates if id(g) not in gone]
        # Groups that only fail together are found above as a block; check what is left once more.
    if bad:
        graph.exclude([g for g, _ in bad], [why for _, why in bad])


def _failing(pruner: "Pruner", groups: list[Group], error: str | None) -> list[tuple[Group, str]]:
    """The groups that fail on their own, by bisection; `error`: what removing all of them gave."""
    if error is None:
        return []
    if len(groups) == 1:
        return [(groups[0], error)]
    half = len(groups) // 2
    found = []
    for part in (groups[:half], groups[half:]):
        found += _failing(pruner, part, _error(pruner, part))
    return found or [(g, f"{error} (together with {len(groups) - 1} other groups)") for g in groups]


def _error(pruner: "Pruner", groups: list[Group]) -> str | None:
    """What goes wrong when the first unit of each group is removed (None if nothing does)."""
    graph = pruner.graph
    remove = torch.zeros(graph.num_units, dtype=torch.bool)
    for group in groups:
        remove[group.offset] = True
    exact = all(s.exact for s in graph.slots if dropped_indices(s.owner, remove).any())
    try:
        reference = pruner._zeroed_outputs(remove)
    except Exception as err:  # the unpruned model itself fails: nothing can be learnt here
        raise RuntimeError(f"the model does not run on its example inputs: {err}") from err
    with removed(pruner.model, graph, remove):
        try:
            pruner._check(reference, exact)
        except Exception as err:
            message = " ".join(str(err).split()).replace("; the removal was undone", "")
            return "removing one of its channels breaks the model: " + (message[:300] + " ..." if len(message) > 300 else message)
    return None
