"""Fitting sigma -> P(position error <= r) on a labelled set, and how reliable the fit is.

Two monotone fits, both in numpy: **logistic** on log sigma (two parameters, Platt's smoothed
targets, slope held <= 0), the default because it is smooth, extrapolates sensibly beyond the
sigmas it saw and needs few items; **isotonic** (pool-adjacent-violators, non-increasing in
sigma), which assumes no shape but needs many items and gives steps. Reliability: expected
calibration error (ECE, 10 equal-width probability bins) in-sample and on held-out items (5-fold
cross-validation: every item predicted by a fit that did not see it), and a reliability diagram.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from loc3r.errors import InputError
from loc3r.runtime.confidence import METHODS, MIN_SIGMA, RADII_M, Calibration, Curve, radius_key

ECE_BINS = 10
FOLDS = 5
MIN_ITEMS = 10
_INCLUSIVE_EPS = 1e-9  # as loc3r.eval.metrics: thresholds are inclusive


def fit_logistic(sigma: ArrayLike, hit: ArrayLike) -> Curve:
    """p = logistic(a + b log sigma), b <= 0, by Newton's method on the cross-entropy against
    Platt's targets ((n+ + 1) / (n+ + 2) for hits, 1 / (n- + 2) for misses: finite even when
    every item is a hit). A slope that comes out positive (sigma not ranking errors) is set to 0."""
    x = np.log(np.clip(np.asarray(sigma, dtype=np.float64), MIN_SIGMA, None))
    hit = np.asarray(hit, dtype=bool)
    n_pos = int(hit.sum())
    target = np.where(hit, (n_pos + 1) / (n_pos + 2), 1 / (hit.size - n_pos + 2))
    mean, scale = float(x.mean()), float(x.std())
    if scale == 0.0:
        return Curve("logistic", {"a": _logit(float(target.mean())), "b": 0.0})
    design = np.stack([np.ones_like(x), (x - mean) / scale], axis=1)
    w = np.array([_logit(float(target.mean())), 0.0])
    for _ in range(100):
        p = _sigmoid(design @ w)
        grad = design.T @ (p - target)
        hess = design.T @ (design * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.max(np.abs(step)) < 1e-10:
            break
    a, b = float(w[0]), float(w[1])
    if b > 0:
        return Curve("logistic", {"a": _logit(float(target.mean())), "b": 0.0})
    return Curve("logistic", {"a": a - b * mean / scale, "b": b / scale})


def fit_isotonic(sigma: ArrayLike, hit: ArrayLike) -> Curve:
    """The non-increasing step function of log sigma closest to the hits in squared error
    (pool adjacent violators); equal sigmas share one value; knots at each block's mean log sigma."""
    x = np.log(np.clip(np.asarray(sigma, dtype=np.float64), MIN_SIGMA, None))
    hit = np.asarray(hit, dtype=np.float64)
    xs, inverse = np.unique(x, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    means = np.bincount(inverse, weights=hit) / counts
    # blocks as (value, weight, x-weighted sum); pooled while the next value is larger
    values: list[float] = []
    weights: list[float] = []
    xsum: list[float] = []
    for value, weight, xv in zip(means, counts, xs * counts):
        values.append(value), weights.append(weight), xsum.append(xv)
        while len(values) > 1 and values[-2] < values[-1]:
            w = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            weights[-2], xsum[-2] = w, xsum[-2] + xsum[-1]
            del values[-1], weights[-1], xsum[-1]
    knots = (np.asarray(xsum) / np.asarray(weights)).tolist()
    return Curve("isotonic", {"log_sigma": knots, "p": [float(v) for v in values]})


FITS = {"logistic": fit_logistic, "isotonic": fit_isotonic}


def expected_calibration_error(p: ArrayLike, hit: ArrayLike, bins: int = ECE_BINS) -> float:
    """Sum over equal-width probability bins of |hit rate - mean p| weighted by the bin's share."""
    p = np.asarray(p, dtype=np.float64)
    hit = np.asarray(hit, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, hit, bins) - np.bincount(which, p, bins))  # per bin: n * |rate - mean p|
    return float(gap.sum() / max(count.sum(), 1))


def reliability_bins(p: ArrayLike, hit: ArrayLike, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: its range, items, mean predicted p and observed hit rate."""
    p = np.asarray(p, dtype=np.float64)
    hit = np.asarray(hit, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            out.append({"low": b / bins, "high": (b + 1) / bins, "items": int(inside.sum()),
                        "mean_p": float(p[inside].mean()), "hit_rate": float(hit[inside].mean())})
    return out


def held_out_predictions(sigma: np.ndarray, hit: np.ndarray, method: str, folds: int = FOLDS) -> np.ndarray:
    """Each item's p from a fit on the other folds (a fixed shuffle, seed 0)."""
    order = np.random.default_rng(0).permutation(sigma.size)
    p = np.empty(sigma.size)
    for fold in np.array_split(order, min(folds, sigma.size)):
        train = np.ones(sigma.size, dtype=bool)
        train[fold] = False
        p[fold] = FITS[method](sigma[train], hit[train])(sigma[fold])
    return p


def labelled_errors(items: Sequence[Any], records: dict[str, dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(sigma, position error) of the items with a ground-truth position and a finite predicted
    pose, and how many items with a position were left out (a non-finite prediction)."""
    sigma, err = [], []
    skipped = 0
    for item in items:
        if item.position is None:
            continue
        pose = records[item.key]["pose"]
        values = [pose["x"], pose["y"], pose["sigma"]]
        if any(v is None or not np.isfinite(v) for v in values) or pose["sigma"] < 0:
            skipped += 1
            continue
        sigma.append(pose["sigma"])
        err.append(float(np.hypot(pose["x"] - item.position[0], pose["y"] - item.position[1])))
    return np.asarray(sigma, dtype=np.float64), np.asarray(err, dtype=np.float64), skipped


def calibrate(
    sigma: np.ndarray, errors: np.ndarray, method: str, bundle_checksum: str, random_weights: bool, source: str
) -> tuple[Calibration, dict[str, Any]]:
    """Fit ``method`` per radius on all items; report ECE of both methods, in-sample and held-out."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}", f"use one of {', '.join(METHODS)}")
    if sigma.size < MIN_ITEMS:
        raise InputError(
            f"only {sigma.size} items have a ground-truth position and a finite pose; calibration needs at least {MIN_ITEMS}",
            "add items with a 'position' to the dataset",
        )
    curves: dict[float, Curve] = {}
    report: dict[str, Any] = {"method": method, "items": int(sigma.size), "radii": {}}
    for radius in RADII_M:
        hit = errors <= radius + _INCLUSIVE_EPS
        curves[radius] = FITS[method](sigma, hit)
        entry: dict[str, Any] = {"hit_rate": float(hit.mean()), "ece": {}, "bins": reliability_bins(curves[radius](sigma), hit)}
        for name, fit in FITS.items():
            entry["ece"][name] = {
                "in_sample": expected_calibration_error(fit(sigma, hit)(sigma), hit),
                "held_out": expected_calibration_error(held_out_predictions(sigma, hit, name), hit),
            }
        report["radii"][radius_key(radius)] = entry
    calibration = Calibration(bundle_checksum, method, curves, int(sigma.size), random_weights, source)
    return calibration, report


def plot_reliability(calibration: Calibration, sigma: np.ndarray, errors: np.ndarray, path: str | Path, title: str) -> Path:
    """The reliability diagram: per radius, observed hit rate against mean predicted p per bin
    (marker area ~ items), the diagonal, and the ECE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loc3r.fileio import atomic_path

    fig, axes = plt.subplots(1, len(RADII_M), figsize=(5 * len(RADII_M), 4.6), squeeze=False)
    for ax, radius in zip(axes[0], RADII_M):
        hit = errors <= radius + _INCLUSIVE_EPS
        p = calibration.curves[radius](sigma)
        bins = reliability_bins(p, hit)
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
        ax.plot([b["mean_p"] for b in bins], [b["hit_rate"] for b in bins], color="tab:blue", linewidth=1)
        ax.scatter([b["mean_p"] for b in bins], [b["hit_rate"] for b in bins], s=[12 + 4 * b["items"] ** 0.75 for b in bins],
                   color="tab:blue", alpha=0.7, label="bins (area ~ items)")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"predicted P(error <= {radius:.1f} m)", ylabel="observed fraction",
               title=f"{radius:.1f} m: ECE {expected_calibration_error(p, hit):.3f} (in-sample), {hit.size} items")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as staging:
        fig.savefig(staging, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))
