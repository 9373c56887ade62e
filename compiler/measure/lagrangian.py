"""The exact (damage, bytes) trade-off over per-unit format choices: a multiple-choice knapsack
traced by its Lagrangian.

Why: the precision search has units (matmuls, or matmuls that share an input) that each take one of
a few formats (INT4 / INT8 / FP16), each with an estimated damage and a byte cost, and damage is
modelled as additive over units (the Fisher/Taylor estimate of compiler/measure/taylor_sensitivity.py
is a sum over units by construction). Minimising sum(damage) + lam * sum(bytes) separates into one
choice per unit; by Everett's theorem (Generalized Lagrange Multiplier method, Operations Research
11(3), 1963) an assignment that minimises it for some lam >= 0 has the least damage of every
assignment with no more bytes. Sweeping lam from infinity down to 0 visits such assignments in
order of bytes: each unit moves along the lower convex hull of its own (bytes, damage) points,
and the hull's steps of all units, sorted by damage removed per byte added, are the path. Every
prefix of that path is a Lagrangian minimiser (at lam = the slope of its last step, the steps
of equal slope are indifferent), so each is exact for its own byte total; the test checks it
against brute force. Points between two hull vertices of the global front are not reached: the
measured bisection over this path (precision_search.search_budget) picks among exact points.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Option:
    label: str  # a format label (int4-gptq, int8, fp16)
    bytes: int
    damage: float


@dataclasses.dataclass(frozen=True)
class Choices:
    """One unit's formats. The first option with the fewest bytes is where the path starts."""

    name: str
    options: tuple[Option, ...]


def lower_hull(options: tuple[Option, ...]) -> list[Option]:
    """The options on the lower-left convex hull of (bytes, damage), by increasing bytes, each with
    strictly less damage than the one before and strictly decreasing damage saved per byte added."""
    ordered = sorted(options, key=lambda o: (o.bytes, o.damage))
    hull: list[Option] = []
    for o in ordered:
        if hull and o.damage >= hull[-1].damage:
            continue  # more bytes for no less damage: never worth it
        if hull and o.bytes == hull[-1].bytes:
            continue  # sorted by damage within equal bytes: the first is the best
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is not below the line from a to o: drop it (a collinear b is dropped too, so slopes strictly fall)
            if (b.damage - a.damage) * (o.bytes - a.bytes) >= (o.damage - a.damage) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


@dataclasses.dataclass(frozen=True)
class Step:
    unit: str
    label: str  # the format the unit moves to
    slope: float  # damage removed per byte added


def upgrade_path(units: list[Choices]) -> tuple[dict[str, str], list[Step]]:
    """(the cheapest assignment, the steps in Lagrangian order). Ties in slope keep the units' order."""
    start: dict[str, str] = {}
    steps: list[tuple[float, int, int, Step]] = []
    for u_index, unit in enumerate(units):
        if not unit.options:
            raise ValueError(f"unit {unit.name} has no format to choose")
        hull = lower_hull(unit.options)
        start[unit.name] = hull[0].label
        for s_index, (low, high) in enumerate(zip(hull, hull[1:])):
            slope = (low.damage - high.damage) / (high.bytes - low.bytes)
            steps.append((-slope, u_index, s_index, Step(unit.name, high.label, slope)))
    steps.sort(key=lambda t: t[:3])
    return start, [s[3] for s in steps]


def after(start: dict[str, str], steps: list[Step], count: int) -> dict[str, str]:
    assignment = dict(start)
    for step in steps[:count]:
        assignment[step.unit] = step.label
    return assignment


def totals(units: list[Choices], assignment: dict[str, str]) -> tuple[int, float]:
    """(bytes, damage) of an assignment."""
    size, damage = 0, 0.0
    for unit in units:
        option = next(o for o in unit.options if o.label == assignment[unit.name])
        size += option.bytes
        damage += option.damage
    return size, damage
