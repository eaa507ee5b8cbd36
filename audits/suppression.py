"""Small-cell suppression: the one place that decides which counts an audit hides.

A count below ``min_group_size`` (primary suppression) is hidden. Hiding it is
not enough when the outputs show a total and the other parts of a sum it belongs
to: the hidden count is then the total minus the shown parts. So for every
*margin* (a total and the cells that add up to it: the levels of one attribute
summing to everyone, the cells of an intersection summing to a level, missing plus
present summing to a group) that holds exactly one hidden cell, the smallest shown
part is hidden too (complementary suppression), repeated until no margin has a
lone hidden cell. Rates count as counts here: a shown rate times a shown group
size is a count, so a hidden count hides its rate.

Every output (the audit's JSON, the HTML and PDF tables, chart series and legends)
reads the masks this module computes, through :class:`audits.frame.AuditFrame`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["Margin", "complementary_suppression"]

#: ``(total, parts)``: cell indices where ``values[total] == sum(values[parts])``.
Margin = tuple[int, Sequence[int]]


def complementary_suppression(values: np.ndarray, primary: np.ndarray,
                              margins: Sequence[Margin]) -> np.ndarray:
    """Extend the ``primary`` mask until no margin lets one hidden cell be solved for.

    For a margin with exactly one hidden member, the smallest shown *part* is
    hidden (a total only when the margin has no other shown part), so a shown
    total, such as the number of patients audited, stays shown wherever possible.
    """
    hidden = np.asarray(primary, bool).copy()
    vals = np.asarray(values, float)
    changed = True
    while changed:
        changed = False
        for total, parts in margins:
            members = [total, *parts]
            if sum(bool(hidden[k]) for k in members) != 1:
                continue
            shown_parts = [k for k in parts if not hidden[k]]
            candidates = shown_parts or ([total] if not hidden[total] else [])
            if not candidates:
                continue
            hidden[min(candidates, key=lambda k: (vals[k], k))] = True
            changed = True
    return hidden
