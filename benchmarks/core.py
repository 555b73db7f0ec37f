"""The pure part of the benchmark: summaries of repeated runs, figures, targets, the table.

No I/O here: each figure module measures and hands its samples to these functions, which turn
them into `Figure`s (a median, the spread of the runs, the anchor's median and the ratio of the
two, and a target verdict), and `render_table` / `to_json` print them. Ratios, not absolute
numbers, are what the benchmark is about: the machines it runs on are shared and noisy, and
only measurements taken side by side in one run compare (PERFORMANCE.md).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

# The issue asks for medians of at least three runs; fewer samples would make a "spread" a lie.
MIN_RUNS: Final = 3

Verdict = Literal["pass", "miss", "-"]


@dataclass(frozen=True, kw_only=True)
class Summary:
    """A median and the range of the runs behind it."""

    median: float
    low: float
    high: float
    runs: int
    samples: tuple[float, ...] = ()

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        values = [float(v) for v in samples if v is not None and math.isfinite(v)]
        if not values:
            return cls(median=math.nan, low=math.nan, high=math.nan, runs=0)
        return cls(
            median=statistics.median(values),
            low=min(values),
            high=max(values),
            runs=len(values),
            samples=tuple(values),
        )

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: how far apart the runs were."""
        if not self.runs or self.median == 0:
            return math.nan
        return 100.0 * (self.high - self.low) / abs(self.median)


@dataclass(frozen=True, kw_only=True)
class Target:
    """A goal from the issue: `check(value, anchor)` (both medians) says whether it is met."""

    text: str
    check: Callable[[float, float], bool]


def at_least(value: float, text: str | None = None) -> Target:
    return Target(text=text or f">= {value:g}", check=lambda v, _a: v >= value)


def at_most(value: float, text: str | None = None) -> Target:
    return Target(text=text or f"<= {value:g}", check=lambda v, _a: v <= value)


def ratio_at_least(value: float) -> Target:
    return Target(text=f"ratio >= {value:g}", check=lambda v, a: a > 0 and v / a >= value)


def added_at_most(value: float, unit: str) -> Target:
    """Our value may exceed the anchor's by at most `value` (e.g. added latency)."""
    return Target(text=f"added <= {value:g} {unit}", check=lambda v, a: v - a <= value)


@dataclass(frozen=True, kw_only=True)
class Figure:
    """One line of the table: our value, its anchor, the ratio, and the target's verdict."""

    group: str
    name: str
    unit: str
    value: Summary
    anchor_name: str = ""
    anchor: Summary | None = None
    target: Target | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.anchor is None or not self.anchor.runs or self.anchor.median == 0:
            return math.nan
        return self.value.median / self.anchor.median

    @property
    def verdict(self) -> Verdict:
        if self.target is None:
            return "-"
        if not self.value.runs:
            return "miss"
        anchor = self.anchor.median if self.anchor is not None else math.nan
        return "pass" if self.target.check(self.value.median, anchor) else "miss"


def fmt(value: float) -> str:
    """A number short enough for a table cell, with a sensible number of digits."""
    if value is None or not math.isfinite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(summary: Summary | None) -> str:
    if summary is None:
        return ""
    if not summary.runs:
        return "n/a"
    if summary.runs == 1 or summary.low == summary.high:
        return fmt(summary.median)
    return f"{fmt(summary.median)} ({fmt(summary.low)}-{fmt(summary.high)})"


HEADER: Final = (
    "figure",
    "unit",
    "Reflector, median (min-max)",
    "anchor",
    "anchor, median (min-max)",
    "ratio",
    "target",
    "",
)


def table_rows(figures: Sequence[Figure]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for fig in figures:
        rows.append(
            (
                f"{fig.group}: {fig.name}",
                fig.unit,
                _cell(fig.value),
                fig.anchor_name,
                _cell(fig.anchor),
                "" if math.isnan(fig.ratio) else f"{fig.ratio:.2f}x",
                fig.target.text if fig.target else "",
                fig.verdict if fig.target else "",
            )
        )
    return rows


def render_table(figures: Sequence[Figure]) -> str:
    """A Markdown table (it goes into the README as is), notes listed under it."""
    rows = [HEADER, *table_rows(figures)]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in HEADER) + "|")
    notes = [f"- {f.group}: {f.name}: {f.note}" for f in figures if f.note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _summary_json(summary: Summary | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    return {
        "median": _finite(summary.median),
        "min": _finite(summary.low),
        "max": _finite(summary.high),
        "runs": summary.runs,
        "spread_pct": _finite(summary.spread_pct),
        "samples": [_finite(s) for s in summary.samples],
    }


def _finite(value: float) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def to_json(figures: Sequence[Figure], context: dict[str, Any]) -> dict[str, Any]:
    return {
        **context,
        "figures": [
            {
                "group": f.group,
                "name": f.name,
                "unit": f.unit,
                "value": _summary_json(f.value),
                "anchor_name": f.anchor_name or None,
                "anchor": _summary_json(f.anchor),
                "ratio": _finite(f.ratio),
                "target": f.target.text if f.target else None,
                "verdict": f.verdict if f.target else None,
                "note": f.note or None,
                **({"extra": f.extra} if f.extra else {}),
            }
            for f in figures
        ],
    }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (q in 0..1); nan for no values."""
    if not ordered:
        return math.nan
    index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return float(ordered[index])


def highest_passing(steps: Sequence[tuple[float, bool]]) -> float:
    """The highest rate of an ascending step search that passed before the first failure."""
    best = 0.0
    for rate, ok in steps:
        if not ok:
            break
        best = rate
    return best
