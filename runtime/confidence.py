"""Calibrated confidence: sigma -> P(position error <= r) for r = 0.5 m and 1.0 m (numpy only).

``loc3r-eval --calibrate`` fits one monotone curve per radius on a labelled set
(``loc3r.eval.calibration``) and writes it as ``calibration.json`` into the bundle folder (or
where ``--calibration-out`` says), stamped with the bundle checksum. The runtime loads it, refuses
one fit for another bundle, and reports ``confidence`` next to sigma. A curve is either
``logistic`` (p = 1 / (1 + exp(-(a + b log sigma))), b <= 0) or ``isotonic`` (a non-increasing
step function of log sigma, interpolated linearly between its knots).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from loc3r.errors import InputError, ModelError
from loc3r.fileio import finite_json, write_text_atomic

RADII_M = (0.5, 1.0)
DEFAULT_RADIUS_M = 1.0
CALIBRATION_FILE = "calibration.json"
FORMAT = "loc3r-calibration"
VERSION = 1
METHODS = ("logistic", "isotonic")
MIN_SIGMA = 1e-6  # metres: sigma is clipped here before its log
NO_CALIBRATION = "no calibration for this bundle: confidence is null (fit one with loc3r-eval DATA.jsonl --calibrate)"
RANDOM_WEIGHTS_NOTE = (
    "calibration of a RANDOM-weights model: its sigma means nothing, so this confidence only shows the mechanism "
    "(tested on synthetic labels whose error grows with sigma)"
)


def radius_key(radius_m: float) -> str:
    """The JSON key of one radius: ``within_0.5m``, ``within_1.0m``."""
    return f"within_{radius_m:.1f}m"


@dataclass(frozen=True)
class Curve:
    """P(error <= radius) as a non-increasing function of sigma."""

    method: str
    params: dict[str, Any]  # logistic: a, b; isotonic: log_sigma (ascending knots), p

    def __call__(self, sigma: ArrayLike) -> np.ndarray:
        x = np.log(np.clip(np.asarray(sigma, dtype=np.float64), MIN_SIGMA, None))
        if self.method == "logistic":
            return 0.5 * (1.0 + np.tanh(0.5 * (self.params["a"] + self.params["b"] * x)))  # logistic, no overflow
        return np.interp(x, self.params["log_sigma"], self.params["p"])

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Curve:
        """Check a curve read from a file: its method, numbers, and monotonicity."""
        bad = ModelError(f"{where} is not a valid calibration curve", "refit it with loc3r-eval --calibrate")
        if not isinstance(data, dict) or data.get("method") not in METHODS:
            raise bad
        if data["method"] == "logistic":
            a, b = data.get("a"), data.get("b")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b)) or b > 0:
                raise bad
            return cls("logistic", {"a": float(a), "b": float(b)})
        try:
            knots = np.asarray(data.get("log_sigma"), dtype=np.float64)
            p = np.asarray(data.get("p"), dtype=np.float64)
        except (TypeError, ValueError):
            raise bad from None
        ok = knots.ndim == 1 and knots.shape == p.shape and knots.size >= 1 and np.all(np.isfinite(knots))
        if not ok or np.any(np.diff(knots) <= 0) or np.any(np.diff(p) > 0) or np.any((p < 0) | (p > 1)):
            raise bad
        return cls("isotonic", {"log_sigma": knots.tolist(), "p": p.tolist()})


@dataclass(frozen=True)
class Calibration:
    """The curves of one bundle, with where they came from."""

    bundle_checksum: str
    method: str
    curves: dict[float, Curve]  # radius (m) -> curve
    items: int
    random_weights: bool
    source: str  # the labelled set it was fit on
    path: Path | None = None  # where it was read from

    def confidence(self, sigma: float) -> dict[str, float] | None:
        """``{"within_0.5m": p, "within_1.0m": p}`` for one sigma (None for a non-finite sigma).

        Each radius has its own curve; a larger radius never gets a lower probability."""
        if not math.isfinite(sigma) or sigma < 0:
            return None
        out: dict[str, float] = {}
        floor = 0.0
        for radius in sorted(self.curves):
            floor = max(floor, float(self.curves[radius](sigma)))
            out[radius_key(radius)] = round(floor, 6)
        return out

    @property
    def note(self) -> str:
        """What the confidence means, in one sentence."""
        base = f"P(position error <= r) from sigma, {self.method} calibration fit on {self.items} items of {self.source}"
        return f"{RANDOM_WEIGHTS_NOTE}; {base}" if self.random_weights else base

    def summary(self) -> dict[str, Any]:
        """What /health, --json's model record and loc3r-eval show about it."""
        return {"method": self.method, "items": self.items, "source": self.source, "random_weights": self.random_weights,
                "file": str(self.path) if self.path else None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "bundle_checksum": self.bundle_checksum,
            "method": self.method,
            "items": self.items,
            "random_weights": self.random_weights,
            "source": self.source,
            "curves": {radius_key(r): c.to_dict() for r, c in sorted(self.curves.items())},
        }


def save_calibration(calibration: Calibration, path: str | Path) -> Path:
    """Write ``calibration`` as JSON, atomically."""
    path = Path(path)
    write_text_atomic(path, finite_json(calibration.to_dict(), indent=2) + "\n")
    return path


def load_calibration(path: str | Path, bundle_checksum: str) -> Calibration:
    """Read and check a calibration file; one fit for another bundle is refused."""
    path = Path(path)
    refit = "refit it with loc3r-eval DATA.jsonl --calibrate --model BUNDLE"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"calibration {path} not found", "check the path, or fit one with loc3r-eval --calibrate") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"cannot read calibration {path} ({exc})", refit) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{path} is not a loc3r calibration", refit)
    if data.get("version") != VERSION:
        raise ModelError(f"{path} is calibration format version {data.get('version')!r}, this loc3r reads {VERSION}", refit)
    theirs = data.get("bundle_checksum")
    if theirs != bundle_checksum:
        raise ModelError(
            f"calibration {path} was fit for bundle checksum {str(theirs)[:12]}, not this bundle's {bundle_checksum[:12]}",
            "delete it or " + refit,
        )
    curves_data = data.get("curves")
    if not isinstance(curves_data, dict) or set(curves_data) != {radius_key(r) for r in RADII_M}:
        raise ModelError(f"{path} does not hold one curve per radius ({', '.join(radius_key(r) for r in RADII_M)})", refit)
    items, method = data.get("items"), data.get("method")
    if not isinstance(items, int) or items < 1 or method not in METHODS or not isinstance(data.get("source"), str):
        raise ModelError(f"{path} is not a valid loc3r calibration (items, method or source)", refit)
    curves = {r: Curve.from_dict(curves_data[radius_key(r)], f"{path} {radius_key(r)}") for r in RADII_M}
    return Calibration(theirs, method, curves, items, bool(data.get("random_weights")), data["source"], path)


def find_calibration(bundle_dir: str | Path, bundle_checksum: str, explicit: str | Path | None = None) -> Calibration | None:
    """``explicit``, else the bundle's own ``calibration.json``, else None (no calibration)."""
    if explicit is not None:
        return load_calibration(explicit, bundle_checksum)
    own = Path(bundle_dir) / CALIBRATION_FILE
    return load_calibration(own, bundle_checksum) if own.is_file() else None


def check_min_confidence(value: float | None, radius_m: float, calibration: Calibration | None, flag: str) -> None:
    """Refuse a confidence floor that cannot be applied (no calibration, out of [0, 1], unknown radius)."""
    if value is None:
        return
    if not (0.0 <= value <= 1.0):
        raise InputError(f"{flag} {value} is not a probability", "pass a number from 0 to 1")
    if radius_m not in RADII_M:
        raise InputError(f"confidence radius {radius_m} m is not calibrated", f"use one of {', '.join(map(str, RADII_M))}")
    if calibration is None:
        raise InputError(f"{flag} needs a calibration, and this bundle has none",
                         "fit one with loc3r-eval DATA.jsonl --calibrate --model BUNDLE, or pass --calibration FILE")


def not_localized_reason(confidence: dict[str, float] | None, min_confidence: float, radius_m: float) -> str | None:
    """Why a pose with ``confidence`` is refused under ``min_confidence`` at ``radius_m`` (None: accepted)."""
    key = radius_key(radius_m)
    if confidence is None:
        return f"the pose is not finite, so it has no confidence (minimum {min_confidence:g} at {radius_m:.1f} m)"
    if confidence[key] < min_confidence:
        return f"confidence {confidence[key]:.3f} of an error <= {radius_m:.1f} m is below the minimum {min_confidence:g}"
    return None
