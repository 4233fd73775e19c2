"""Plain-text tables and number formats for the benchmark report."""

from __future__ import annotations

import math
from collections.abc import Sequence

Cell = str | int | float | None
MB = 1_000_000  # the report's MB are 10^6 bytes


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """The median (mean of the middle two for an even count); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ms(seconds: float, signed: bool = False) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:+.2f}" if signed else f"{seconds * 1000:.2f}"


def mb(size: float) -> str:
    return f"{size / MB:.1f}"


def ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def share(value: float) -> str:
    """CPU time per wall second as a percentage of one core."""
    return f"{value * 100:.0f} %"


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], indent: str = "  ") -> str:
    """Columns padded to their widest cell; the first one left-aligned, numbers right."""
    text = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return (indent + "  ".join(parts)).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in text)])


def _cell(value: Cell) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value
