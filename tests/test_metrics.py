"""loc3r-eval's metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loc3r.eval import metrics as m

# -- localization ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred_deg", "gt_deg", "expected"),
    [(179, -179, 2), (-179, 179, 2), (-170, 170, 20), (0, 360, 0), (0, 180, 180), (90, -90, 180), (10, 40, 30), (350, 10, 20)],
)
def test_angle_error_wraps_around(pred_deg: float, gt_deg: float, expected: float) -> None:
    error = m.angle_errors_deg(math.radians(pred_deg), math.radians(gt_deg))
    assert error == pytest.approx(expected, abs=1e-9)


def test_position_error_is_euclidean_on_the_plane() -> None:
    errors = m.position_errors([[0.3, 0.4], [1.0, 1.0], [-1.0, 2.0]], [[0.0, 0.0], [1.0, 1.0], [2.0, -2.0]])
    np.testing.assert_allclose(errors, [0.5, 0.0, 5.0])


def test_position_thresholds_are_inclusive() -> None:
    # (0.3, 0.4) is exactly 0.5 m away; 1.0 m exactly at the second threshold
    errors = m.position_errors([[0.3, 0.4], [1.0, 0.0], [0.0, 0.5000001], [2.0, 0.0]], np.zeros((4, 2)))
    out = m.position_metrics(errors)
    assert out["acc@0.5m"] == pytest.approx(1 / 4)
    assert out["acc@1.0m"] == pytest.approx(3 / 4)


def test_position_metrics_by_hand() -> None:
    out = m.position_metrics([0.5, 1.0, 1.2, 0.2])
    assert out == pytest.approx({"acc@0.5m": 0.5, "acc@1.0m": 0.75, "pos_err_mean_m": 0.725, "pos_err_median_m": 0.75})


def test_angle_thresholds_are_inclusive_after_radian_round_off() -> None:
    # 15 and 30 degrees computed from radians come out a hair above the threshold
    errors = m.angle_errors_deg(np.radians([15.0, 30.0, 30.001, 100.0]), np.zeros(4))
    out = m.orientation_metrics(errors)
    assert out["acc@15deg"] == pytest.approx(1 / 4)
    assert out["acc@30deg"] == pytest.approx(2 / 4)
    assert out["ang_err_median_deg"] == pytest.approx(30.0005)
    assert out["ang_err_mean_deg"] == pytest.approx((15 + 30 + 30.001 + 100) / 4)


def test_wrapped_errors_feed_the_accuracy() -> None:
    errors = m.angle_errors_deg(np.radians([179.0, 170.0]), np.radians([-179.0, -170.0]))
    assert m.orientation_metrics(errors)["acc@15deg"] == pytest.approx(0.5)  # 2 deg and 20 deg


def test_no_items_give_none() -> None:
    assert set(m.position_metrics([]).values()) == {None}
    assert set(m.orientation_metrics([]).values()) == {None}
    assert set(m.uncertainty_metrics([], []).values()) == {None}


# -- question answering ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The chair.", "chair"),
        ("  On the   LEFT!  ", "on left"),
        ("An apple, a pear", "apple pear"),
        ("It’s “there”", "its there"),
        ("Two", "2"),
        ("zero or twenty", "0 or 20"),
        ("twenty-one", "twentyone"),  # hyphens are punctuation and vanish: not a number word
        ("someone", "someone"),  # number words are whole words only
        ("theatre", "theatre"),  # articles too
        ("1.5 m", "15 m"),  # punctuation is deleted, as in SQuAD/LEO
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert m.normalize_answer(text) == normalized


@pytest.mark.parametrize(
    ("prediction", "answers", "em", "em_r"),
    [
        ("The chair.", "chair", True, True),
        ("two", "2", True, True),
        ("There are 2", "two", False, True),  # refined: the answer is contained in the prediction
        ("left", "on the left side", False, True),  # refined: the prediction is contained in the answer
        ("table", "chair", False, False),
        ("", "chair", False, False),  # an empty prediction never matches a non-empty answer
        ("", "", True, True),
        ("12", "2", False, True),  # containment is on characters, as in LEO's answer_match
        ("black chair", "chair black", False, False),
        ("chair", ["table", "Chair!"], True, True),  # any of several accepted answers
        ("brown", ["table", "chair"], False, False),
    ],
)
def test_exact_and_refined_match(prediction: str, answers: str | list[str], em: bool, em_r: bool) -> None:
    assert m.exact_match(prediction, answers) is em
    assert m.refined_exact_match(prediction, answers) is em_r


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(C) the sofa", "C"),
        ("The answer is D.", "D"),
        ("I think B, maybe C", "B"),
        ("A.", "A"),
        ("A chair near the door", "B"),  # "A chair": the article, then the option text "chair"
        ("It is the table on the left", "C"),  # earliest option text, longest on the same start
        ("no idea", None),
        ("E", None),  # not an option
        ("b", None),  # lowercase letters are words, not choices
    ],
)
def test_extract_choice(text: str, expected: str | None) -> None:
    options = {"A": "table", "B": "chair", "C": "table on the left", "D": "sofa"}
    assert m.extract_choice(text, options) == expected


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("3", 3.0),
        ("about 2.5 metres", 2.5),
        ("3.5m", 3.5),
        ("There are two chairs and 3 tables", 2.0),
        ("Twelve", 12.0),
        ("1,200 tiles", 1200.0),
        ("-4 degrees", -4.0),
        (".5", 0.5),
        ("room2 has none", None),
        ("none", None),
    ],
)
def test_parse_number(text: str, number: float | None) -> None:
    assert m.parse_number(text) == number


@pytest.mark.parametrize(
    ("prediction", "answer", "mra"),
    [
        (10.0, 10.0, 1.0),
        (9.0, 10.0, 0.8),  # relative error 0.1 < 1 - theta for theta = 0.50 .. 0.85
        (12.0, 10.0, 0.6),  # 0.2: theta = 0.50 .. 0.75
        (8.5, 10.0, 0.7),  # 0.15 is not < 0.15: strict, and no float drift at 1 - 0.85
        (5.0, 10.0, 0.0),  # 0.5 is not < 0.5
        (15.0, 10.0, 0.0),
        (None, 10.0, 0.0),
        (0.0, 0.0, 1.0),
        (1.0, 0.0, 0.0),
        (-2.2, -2.0, 0.8),
    ],
)
def test_mean_relative_accuracy(prediction: float | None, answer: float, mra: float) -> None:
    assert m.mean_relative_accuracy(prediction, answer) == pytest.approx(mra)


def test_mra_thresholds_are_vsi_bench_ones() -> None:
    assert m.MRA_TOLERANCES == pytest.approx([1 - t for t in np.arange(0.5, 0.951, 0.05)])


# -- uncertainty ----------------------------------------------------------------------------


def test_average_ranks_share_ties() -> None:
    np.testing.assert_allclose(m.average_ranks([3, 1, 3, 2]), [3.5, 1.0, 3.5, 2.0])
    np.testing.assert_allclose(m.average_ranks([5, 5, 5]), [2.0, 2.0, 2.0])


def test_spearman_known_values() -> None:
    assert m.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert m.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks 1 2 3 4 vs 1 3 2 4: 1 - 6 * 2 / (4 * 15)
    assert m.spearman([0.1, 0.2, 0.3, 0.4], [0.1, 2.0, 0.5, 3.0]) == pytest.approx(0.8)
    # with ties: ranks 1 2 3 4 vs 1 2.5 2.5 4 -> 4.5 / sqrt(5 * 4.5) = sqrt(0.9)
    assert m.spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(math.sqrt(0.9))


def test_spearman_undefined() -> None:
    assert m.spearman([1.0], [2.0]) is None
    assert m.spearman([1, 1, 1], [1, 2, 3]) is None


def test_auroc_known_values() -> None:
    assert m.auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert m.auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert m.auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    # positives 2, 3 vs negatives 1, 2: 1 + 0.5 + 1 + 1 of 4 pairs
    assert m.auroc([1, 2, 2, 3], [False, True, False, True]) == 0.875
    assert m.auroc([1, 2], [True, True]) is None
    assert m.auroc([1, 2], [False, False]) is None


@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=30))
def test_auroc_equals_pairwise_count(pairs: list[tuple[int, bool]]) -> None:
    scores = np.array([s for s, _ in pairs], dtype=float)
    positive = np.array([p for _, p in pairs])
    pos, neg = scores[positive], scores[~positive]
    if not pos.size or not neg.size:
        assert m.auroc(scores, positive) is None
        return
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert m.auroc(scores, positive) == pytest.approx(wins / (pos.size * neg.size))


@settings(deadline=None)  # the first example imports scipy
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=3, max_size=30))
def test_spearman_matches_scipy(pairs: list[tuple[int, int]]) -> None:
    stats = pytest.importorskip("scipy.stats")
    a, b = np.array(pairs, dtype=float).T
    ours = m.spearman(a, b)
    if ours is None:
        assert np.ptp(a) == 0 or np.ptp(b) == 0
    else:
        assert ours == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_keep_most_confident_fractions() -> None:
    sigma = [0.4, 0.1, 0.3, 0.2, 0.5]
    assert list(m.keep_most_confident(sigma, 0.5)) == [1, 3, 2]  # ceil(2.5) = 3 lowest sigmas
    assert list(m.keep_most_confident(sigma, 0.8)) == [1, 3, 2, 0]
    assert list(m.keep_most_confident(sigma, 1.0)) == [1, 3, 2, 0, 4]
    assert len(m.keep_most_confident(np.arange(10), 0.7)) == 7  # 0.7 * 10 is 7.000000000000001
    assert len(m.keep_most_confident([1.0], 0.5)) == 1
    assert list(m.keep_most_confident([0.2, 0.1, 0.2, 0.1], 0.5)) == [1, 3]  # ties keep input order


def test_uncertainty_metrics_by_hand() -> None:
    sigma = [0.1, 0.2, 0.3, 0.4, 0.5]
    errors = [0.2, 0.9, 1.5, 1.0, 2.0]  # correct at 1.0 m (inclusive): yes yes no yes no
    out = m.uncertainty_metrics(sigma, errors)
    assert out["acc@1.0m_keep50"] == pytest.approx(2 / 3)
    assert out["acc@1.0m_keep80"] == pytest.approx(3 / 4)
    assert out["acc@1.0m_keep100"] == pytest.approx(3 / 5)
    # wrong sigmas 0.3, 0.5 vs right 0.1, 0.2, 0.4: 0.3 beats 2 of 3, 0.5 beats 3 of 3
    assert out["sigma_auroc@1.0m"] == pytest.approx(5 / 6)
    # ranks 1 2 3 4 5 vs 1 2 4 3 5: 1 - 6 * 2 / (5 * 24)
    assert out["sigma_spearman"] == pytest.approx(0.9)
