"""The paper's metrics as pure numpy functions: localization, QA, and how far sigma ranks errors.

Localization follows SQA3D's localization task as the Loc3R paper reports it: Acc@0.5m and
Acc@1.0m on the BEV position, Acc@15deg and Acc@30deg on the heading, thresholds inclusive.
QA: EM / EM-R as LEO (embodied-generalist ``clean_answer`` + ``answer_match``) scores SQA3D and
ScanQA, multiple-choice accuracy, and VSI-Bench's mean relative accuracy (MRA) for numbers.
Uncertainty: Spearman(sigma, position error), AUROC of sigma for "wrong at 1.0 m", and Acc@1.0m
on the most confident fraction of items. Functions that have no defined value for their input
(no items, one class only, constant input) return None.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

POSITION_THRESHOLDS_M = (0.5, 1.0)
ANGLE_THRESHOLDS_DEG = (15.0, 30.0)
WRONG_AT_M = 1.0
KEEP_FRACTIONS = (0.5, 0.8, 1.0)
# VSI-Bench's confidence thresholds theta = 0.50, 0.55, ..., 0.95 as tolerances 1 - theta,
# written as exact twentieths so that e.g. 1 - 0.85 is not 0.15000000000000002.
MRA_TOLERANCES = tuple((10 - k) / 20 for k in range(10))
# Slack for "inclusive" thresholds: an error of exactly 15 deg computed from radians is 15 + 2e-15.
_INCLUSIVE_EPS = 1e-9

NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ARTICLES = {"a", "an", "the"}
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)|\b(" + "|".join(NUMBER_WORDS) + r")\b",
    re.IGNORECASE,
)
_LETTER_RE = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
_ARTICLE_AFTER_A_RE = re.compile(r" [a-z]")


# -- localization ---------------------------------------------------------------------------


def position_errors(pred_xy: ArrayLike, gt_xy: ArrayLike) -> np.ndarray:
    """Euclidean distance on the BEV plane between rows of (n, 2) arrays, in metres."""
    diff = np.asarray(pred_xy, dtype=np.float64) - np.asarray(gt_xy, dtype=np.float64)
    return np.hypot(diff[..., 0], diff[..., 1])


def angle_errors_deg(pred_rad: ArrayLike, gt_rad: ArrayLike) -> np.ndarray:
    """Absolute heading error wrapped to [0, 180] degrees (179 vs -179 deg is 2 deg)."""
    diff = np.asarray(pred_rad, dtype=np.float64) - np.asarray(gt_rad, dtype=np.float64)
    return np.degrees(np.abs(np.remainder(diff + np.pi, 2 * np.pi) - np.pi))


def accuracy_within(errors: ArrayLike, threshold: float) -> float | None:
    """Fraction of errors ``<= threshold`` (inclusive)."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0:
        return None
    return float(np.mean(errors <= threshold + _INCLUSIVE_EPS))


def position_metrics(errors_m: ArrayLike) -> dict[str, float | None]:
    """Acc@0.5m, Acc@1.0m, mean and median position error."""
    errors = np.asarray(errors_m, dtype=np.float64)
    out = {f"acc@{t}m": accuracy_within(errors, t) for t in POSITION_THRESHOLDS_M}
    out["pos_err_mean_m"] = float(errors.mean()) if errors.size else None
    out["pos_err_median_m"] = float(np.median(errors)) if errors.size else None
    return out


def orientation_metrics(errors_deg: ArrayLike) -> dict[str, float | None]:
    """Acc@15deg, Acc@30deg, mean and median (wrapped) heading error."""
    errors = np.asarray(errors_deg, dtype=np.float64)
    out = {f"acc@{t:g}deg": accuracy_within(errors, t) for t in ANGLE_THRESHOLDS_DEG}
    out["ang_err_mean_deg"] = float(errors.mean()) if errors.size else None
    out["ang_err_median_deg"] = float(np.median(errors)) if errors.size else None
    return out


# -- question answering ---------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, number words zero..twenty to
    digits, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    words = [str(NUMBER_WORDS.get(word, word)) for word in text.split() if word not in _ARTICLES]
    return " ".join(words)


def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """EM: the normalised prediction equals a normalised reference answer (LEO scores EM on
    cleaned answers too, so EM-R - EM is exactly the containment rule)."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(answer) for answer in _as_list(answers))


def refined_exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """EM-R (LEO's refined EM): with whitespace removed, the normalised prediction equals,
    contains or is contained in a normalised reference answer.

    Unlike LEO, an empty prediction matches only an empty answer (LEO's substring test counts
    an empty prediction as a match for everything).
    """
    pred = normalize_answer(prediction).replace(" ", "")
    for answer in _as_list(answers):
        ref = normalize_answer(answer).replace(" ", "")
        if pred == ref or (pred and ref and (pred in ref or ref in pred)):
            return True
    return False


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter an answer picks: the first standalone capital letter that names an
    option ("B", "(B)", "B." ...; "A" followed by a lowercase word is read as the article),
    else the option whose normalised text occurs earliest in the normalised answer."""
    for match in _LETTER_RE.finditer(text):
        letter = match.group(1)
        if letter not in options:
            continue
        if letter == "A" and _ARTICLE_AFTER_A_RE.match(text, match.end()):
            continue
        return letter
    answer = f" {normalize_answer(text)} "
    found: list[tuple[int, int, str]] = []
    for letter, option in options.items():
        needle = normalize_answer(option)
        at = answer.find(f" {needle} ") if needle else -1
        if at >= 0:
            found.append((at, -len(needle), letter))
    return min(found)[2] if found else None


def parse_number(text: str) -> float | None:
    """The first number in ``text``: digits ("3", "-2.5", "1,200") or a word zero..twenty."""
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    if match.group(1):
        return float(NUMBER_WORDS[match.group(1).lower()])
    return float(match.group(0).replace(",", ""))


def mean_relative_accuracy(prediction: float | None, answer: float) -> float:
    """VSI-Bench MRA: mean over theta in 0.50..0.95 of 1[|pred - gt| / |gt| < 1 - theta].

    No parsed number scores 0. For gt = 0 the relative error is 0 when pred = 0, else infinite.
    """
    if prediction is None:
        return 0.0
    if answer == 0:
        relative = 0.0 if prediction == 0 else math.inf
    else:
        relative = abs(prediction - answer) / abs(answer)
    return float(np.mean([relative < tolerance for tolerance in MRA_TOLERANCES]))


# -- uncertainty ----------------------------------------------------------------------------


def average_ranks(values: ArrayLike) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.reshape(values.shape)]


def spearman(a: ArrayLike, b: ArrayLike) -> float | None:
    """Spearman's rho: Pearson correlation of average ranks. None if n < 2 or a side is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.size < 2:
        return None
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denom) if denom > 0 else None


def auroc(scores: ArrayLike, positive: ArrayLike) -> float | None:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U / n+ n-).

    None when either class is empty.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def keep_most_confident(sigma: ArrayLike, fraction: float) -> np.ndarray:
    """Indices of the ceil(fraction * n) (at least 1) items with the lowest sigma; equal sigmas
    keep input order."""
    sigma = np.asarray(sigma, dtype=np.float64)
    count = max(1, math.ceil(round(fraction * sigma.size, 9)))
    return np.argsort(sigma, kind="stable")[:count]


def uncertainty_metrics(sigma: ArrayLike, errors_m: ArrayLike) -> dict[str, float | None]:
    """Whether sigma ranks position errors: Spearman, AUROC for "error > 1.0 m", and Acc@1.0m
    on the 50/80/100% of items with the lowest sigma."""
    sigma = np.asarray(sigma, dtype=np.float64)
    errors = np.asarray(errors_m, dtype=np.float64)
    correct = errors <= WRONG_AT_M + _INCLUSIVE_EPS
    out: dict[str, float | None] = {
        "sigma_spearman": spearman(sigma, errors),
        f"sigma_auroc@{WRONG_AT_M}m": auroc(sigma, ~correct),
    }
    for fraction in KEEP_FRACTIONS:
        kept = correct[keep_most_confident(sigma, fraction)] if sigma.size else correct
        out[f"acc@{WRONG_AT_M}m_keep{round(fraction * 100)}"] = float(kept.mean()) if kept.size else None
    return out
