"""Multi-label tagging metrics: AP, ROC AUC, d', lwlrap and the reports built on them."""

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import (
    average_precision_score,
    label_ranking_average_precision_score,
    roc_auc_score,
)

from src.evaluation import metrics
from src.evaluation.metrics import (
    average_precision,
    d_prime,
    evaluation_report,
    lwlrap,
    multilabel_report,
    roc_auc,
)


def sk_per_class(y, s):
    """sklearn's per-column AP and AUC, NaN where sklearn's value is undefined."""
    ap, auc = [], []
    for k in range(y.shape[1]):
        pos = y[:, k].sum()
        ap.append(average_precision_score(y[:, k], s[:, k]) if pos else np.nan)
        both = 0 < pos < len(y)
        auc.append(roc_auc_score(y[:, k], s[:, k]) if both else np.nan)
    return np.array(ap), np.array(auc)


def sk_lwlrap(y, s):
    return label_ranking_average_precision_score(y, s, sample_weight=y.sum(axis=1))


# ----------------------------------------------------------------------------- hand-made


def column(values):
    return np.asarray(values, dtype=float)[:, None]


def test_ap_auc_distinct_scores_by_hand():
    # ranking (desc): +, -, +, -  ->  AP = (1/1 + 2/3) / 2 ; AUC: 3 of 4 pairs ordered
    y, s = column([1, 0, 1, 0]), column([0.9, 0.8, 0.7, 0.1])
    np.testing.assert_allclose(average_precision(y, s), [5 / 6])
    np.testing.assert_allclose(roc_auc(y, s), [3 / 4])


def test_ties_across_positive_and_negative_by_hand():
    # {+, -, +} tied at the top enter together: both positives get precision 2/3.
    # (positives first in the tie would give AP 1; negative first would give 7/12.)
    # AUC: each positive ties one negative (1/2) and beats the other (1) -> 3/4.
    y, s = column([1, 0, 1, 0]), column([0.5, 0.5, 0.5, 0.1])
    np.testing.assert_allclose(average_precision(y, s), [2 / 3])
    np.testing.assert_allclose(roc_auc(y, s), [3 / 4])


def test_all_scores_equal_gives_prevalence_and_half():
    y, s = column([1, 0, 0, 1, 0]), column([3.0] * 5)
    np.testing.assert_allclose(average_precision(y, s), [2 / 5])
    np.testing.assert_allclose(roc_auc(y, s), [1 / 2])


def test_integer_quantised_scores_by_hand():
    # groups (desc): {3: +}, {2: +, +, -}, {1: -, -}
    # AP = 1/3 * 1 + 2/3 * 3/4 = 5/6 ; AUC = (3 + 2.5 + 2.5) / 9 = 8/9
    y = column([0, 1, 1, 0, 1, 0])
    s = np.array([1, 2, 2, 1, 3, 2])[:, None]  # integer dtype
    np.testing.assert_allclose(average_precision(y, s), [5 / 6])
    np.testing.assert_allclose(roc_auc(y, s), [8 / 9])


def test_all_negative_and_all_positive_classes():
    y = np.array([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 0]])
    s = np.array([[0.1, 0.4, 0.9], [0.2, 0.3, 0.8], [0.3, 0.2, 0.7], [0.4, 0.1, 0.6]])
    ap, auc = average_precision(y, s), roc_auc(y, s)
    assert np.isnan(ap[0]) and np.isnan(auc[0])  # no positive
    assert ap[1] == pytest.approx(1.0) and np.isnan(auc[1])  # no negative
    np.testing.assert_allclose([ap[2], auc[2]], [(1 + 2 / 3) / 2, 3 / 4])

    r = multilabel_report(y, s, ["silence", "always", "some"])
    assert r["classes_without_positives"] == {"count": 1, "names": ["silence"]}
    assert r["num_classes_evaluated"] == 2
    assert r["mAP"] == pytest.approx((1 + 5 / 6) / 2)  # the all-negative class is left out
    assert r["mean_auc"] == pytest.approx(3 / 4)  # only "some" has both
    assert r["per_class_ap"] == {
        "silence": None,
        "always": pytest.approx(1.0),
        "some": pytest.approx(5 / 6),
    }
    assert r["per_class_auc"] == {"silence": None, "always": None, "some": pytest.approx(3 / 4)}
    assert r["num_clips"] == 4


def test_lwlrap_by_hand():
    # clip 0: labels {0, 2}; ranking 0, 1, 2 -> precisions 1/1 and 2/3
    # clip 1: label {1}; ranking 2, 0, 1 -> precision 1/3
    # clip 2: no label, does not count
    # lwlrap = (1 + 2/3 + 1/3) / 3 = 2/3 (per-clip LRAP would give 7/12)
    y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    s = np.array([[0.9, 0.8, 0.1], [0.5, 0.2, 0.9], [0.3, 0.2, 0.1]])
    assert lwlrap(y, s) == pytest.approx(2 / 3)
    assert lwlrap(y[:2], s[:2]) == pytest.approx(2 / 3)


def test_lwlrap_ties_count_as_ranked_above():
    # the positive ties with a negative: 1 positive among 2 labels at or above it
    y = np.array([[1, 0, 0], [0, 1, 1]])
    s = np.array([[0.5, 0.5, 0.1], [0.0, 7.0, 7.0]])
    assert lwlrap(y, s) == pytest.approx((1 / 2 + 1 + 1) / 3)


def test_lwlrap_without_labels_is_nan():
    assert math.isnan(lwlrap(np.zeros((3, 2)), np.ones((3, 2))))


# ----------------------------------------------------------------------------- d'


def test_d_prime_known_values():
    assert d_prime(0.5) == 0.0
    assert isinstance(d_prime(0.5), float)
    assert d_prime(norm.cdf(1.0)) == pytest.approx(math.sqrt(2.0))
    assert d_prime(0.975) == pytest.approx(1.959963984540054 * math.sqrt(2.0))
    assert d_prime(0.25) == pytest.approx(-0.6744897501960817 * math.sqrt(2.0))
    assert d_prime(1.0) == math.inf
    aucs = np.array([0.1, 0.5, 0.7, 0.93])
    out = d_prime(aucs)
    assert isinstance(out, np.ndarray) and out.shape == (4,)
    np.testing.assert_allclose(out, norm().ppf(aucs) * np.sqrt(2.0))


def test_report_d_prime_is_of_the_mean_auc():
    # per-class AUCs 1/2 and 1 -> mean 3/4; the mean of the per-class d' would be inf
    y = np.array([[1, 1], [0, 0], [1, 1], [0, 0]])
    s = np.array([[0.5, 0.9], [0.5, 0.1], [0.5, 0.8], [0.5, 0.2]])
    r = multilabel_report(y, s, ["a", "b"])
    assert r["mean_auc"] == pytest.approx(3 / 4)
    assert r["d_prime"] == pytest.approx(math.sqrt(2.0) * norm.ppf(0.75))


# ----------------------------------------------------------------------------- vs sklearn


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [1, 6, 17])
@pytest.mark.parametrize("quantise", [False, True])
def test_matches_sklearn_on_random_data(seed, k, quantise):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    y = (rng.random((n, k)) < rng.uniform(0.02, 0.6, size=k)).astype(int)
    s = rng.standard_normal((n, k))
    if quantise:  # heavy ties, across positives and negatives
        s = np.round(s * 2)
    ap, auc = average_precision(y, s), roc_auc(y, s)
    ref_ap, ref_auc = sk_per_class(y, s)
    np.testing.assert_allclose(ap, ref_ap, rtol=1e-12, atol=1e-12)  # NaNs must coincide
    np.testing.assert_allclose(auc, ref_auc, rtol=1e-12, atol=1e-12)
    assert lwlrap(y, s) == pytest.approx(sk_lwlrap(y, s), rel=1e-12)

    r = multilabel_report(y, s, [f"c{i}" for i in range(k)])
    has_pos = y.sum(0) > 0
    assert r["num_classes_evaluated"] == int(has_pos.sum())
    if has_pos.any():
        assert r["mAP"] == pytest.approx(ref_ap[has_pos].mean(), rel=1e-12)
    assert r["classes_without_positives"]["count"] == int((~has_pos).sum())


def test_matches_sklearn_across_blocks(monkeypatch):
    # small blocks so both the class loop and the clip loop run over several blocks
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 50)
    rng = np.random.default_rng(7)
    y = (rng.random((37, 23)) < 0.3).astype(int)
    s = rng.integers(0, 4, size=(37, 23)).astype(np.float32)
    ref_ap, ref_auc = sk_per_class(y, s)
    np.testing.assert_allclose(average_precision(y, s), ref_ap, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(roc_auc(y, s), ref_auc, rtol=1e-12, atol=1e-12)
    assert lwlrap(y, s) == pytest.approx(sk_lwlrap(y, s), rel=1e-12)


def test_lwlrap_equals_weighted_lrap_with_empty_clips():
    rng = np.random.default_rng(11)
    y = (rng.random((60, 9)) < 0.15).astype(int)
    y[:5] = 0  # clips with no label
    y[5] = 1  # a clip with every label
    s = np.round(rng.standard_normal((60, 9)))
    keep = y.sum(1) > 0
    expected = label_ranking_average_precision_score(y[keep], s[keep], sample_weight=y[keep].sum(1))
    assert lwlrap(y, s) == pytest.approx(expected, rel=1e-12)
    assert lwlrap(y, s) == pytest.approx(sk_lwlrap(y, s), rel=1e-12)
    # differs from the unweighted per-clip mean
    assert lwlrap(y, s) != pytest.approx(label_ranking_average_precision_score(y[keep], s[keep]))


def test_only_the_order_of_scores_matters_and_label_dtypes():
    rng = np.random.default_rng(3)
    y = rng.random((50, 4)) < 0.3
    logits = rng.standard_normal((50, 4)).astype(np.float32)
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    a = multilabel_report(y, logits, list("abcd"))
    for labels in (y, y.astype(int), y.astype(np.float32)):
        b = multilabel_report(labels, probs, list("abcd"))
        for key in ("mAP", "mean_auc", "d_prime", "lwlrap"):
            assert b[key] == pytest.approx(a[key], rel=1e-12)


# ----------------------------------------------------------------------------- reports


def test_evaluation_report_dispatch():
    logits = np.array([[2.0, 0.1], [0.3, 1.0], [1.5, 0.2]])
    single = evaluation_report("single", [0, 1, 1], logits, ["a", "b"])
    assert single["primary_metric"] == "accuracy"
    assert single["primary"] == pytest.approx(2 / 3) == single["accuracy"]
    assert "confusion_matrix" in single

    y = np.array([[1, 0], [0, 1], [1, 1]])
    multi = evaluation_report("multi", y, logits, ["a", "b"])
    assert multi["primary_metric"] == "mAP"
    assert multi["primary"] == multi["mAP"] == pytest.approx((1 + 1) / 2)
    assert "lwlrap" in multi

    with pytest.raises(ValueError, match="label_type"):
        evaluation_report("multiclass", y, logits, ["a", "b"])


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        (np.zeros((4, 3)), np.zeros((4, 2)), "shape"),
        (np.zeros((4, 3)), np.zeros((3, 3)), "shape"),
        (np.zeros(4), np.zeros(4), "2-D"),
        (np.zeros((2, 2)), np.array([[0.1, np.nan], [0.2, 0.3]]), "NaN"),
        (np.array([[0, 2], [1, 0]]), np.zeros((2, 2)), "0/1"),
        (np.array([[0.5, 0.5], [1, 0]]), np.zeros((2, 2)), "0/1"),
        (np.array([[np.nan, 1], [1, 0]]), np.zeros((2, 2)), "0/1"),
        (np.array([[-1, 1], [1, 0]]), np.zeros((2, 2)), "0/1"),
    ],
)
def test_invalid_inputs_raise(y, s, match):
    for fn in (average_precision, roc_auc, lwlrap):
        with pytest.raises(ValueError, match=match):
            fn(y, s)
    with pytest.raises(ValueError, match=match):
        multilabel_report(y, s, [f"c{i}" for i in range(np.shape(y)[-1])])


def test_class_name_count_must_match():
    with pytest.raises(ValueError, match="class names"):
        multilabel_report(np.zeros((2, 3)), np.zeros((2, 3)), ["a", "b"])
