"""Summaries of repeated measurements: median, min and max, and baseline/optimized ratios."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Summary:
    """Median, min and max of ``n`` measurements (seconds unless stated)."""

    median: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Median, min and max of ``values`` (at least one)."""
    if not values:
        raise ValueError("no measurements to summarize")
    return Summary(statistics.median(values), min(values), max(values), len(values))


def summarize_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, Summary]:
    """One :class:`Summary` per key over repeated runs (a key missing from a run is skipped)."""
    keys = [key for key in runs[0]] if runs else []
    return {key: summarize([run[key] for run in runs if key in run]) for key in keys}


def ratio(baseline: float, optimized: float) -> float | None:
    """``baseline / optimized`` (how many times faster); None when ``optimized`` is 0."""
    return baseline / optimized if optimized > 0 else None


def ratios(baseline: Mapping[str, Summary], optimized: Mapping[str, Summary]) -> dict[str, float | None]:
    """Ratio of medians for every stage both sides measured."""
    return {key: ratio(baseline[key].median, optimized[key].median) for key in baseline if key in optimized}
