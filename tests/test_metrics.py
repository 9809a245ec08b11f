"""Tests of evals/metrics.py's collapse measures, each against a brute-force or hand-worked value:

    python -m pytest -q tests/test_metrics.py
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evals import metrics  # noqa: E402
from evals.metrics import macro_f1  # noqa: E402


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_participation_ratio_matches_the_covariance_eigenvalues_and_a_hand_worked_case():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)) * np.linspace(3, 0.1, 12)  # an uneven spectrum
    lam = np.linalg.eigvalsh(np.cov(_unit(x).T))  # brute force: the eigenvalues themselves
    assert metrics.participation_ratio(x) == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-6)
    # Hand-worked: unit rows +-e_1 .. +-e_k, each equally often, have covariance (1/k) I_k: PR = k.
    for k in (1, 3, 5):
        rows = np.concatenate([np.eye(8)[:k], -np.eye(8)[:k]] * 10)
        assert metrics.participation_ratio(rows) == pytest.approx(k)


def test_mean_pairwise_cosine_matches_a_double_loop_over_distinct_pairs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 6)) + 0.7
    u = _unit(x)
    brute = np.mean([u[i] @ u[j] for i in range(40) for j in range(40) if i != j])
    assert metrics.mean_pairwise_cosine(x) == pytest.approx(brute, rel=1e-6)
    assert metrics.mean_pairwise_cosine(np.ones((5, 3))) == pytest.approx(1.0)  # every song the same vector
    # Hand-worked: e1, e2, -e1: cosines 0, -1, 0 over the 3 unordered pairs -> -1/3.
    assert metrics.mean_pairwise_cosine(np.array([[1.0, 0], [0, 2], [-3, 0]])) == pytest.approx(-1 / 3)


def _spread(n=400, d=100, shared=1.0, k=2, spread=0.6, seed=0):
    """A shared direction (weight `shared`) plus noise of std `spread` in k others and a little in all."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d))
    x[:, 0] = shared
    x[:, 1:1 + k] = spread * rng.standard_normal((n, k))
    return x + 0.01 * rng.standard_normal((n, d))


def test_a_collapsed_embedding_is_warned_about_and_a_healthy_one_is_not():
    rng = np.random.default_rng(2)
    collapsed, healthy = _spread(), rng.standard_normal((400, 100))
    h = metrics.embedding_health(collapsed)
    assert h["mean_cosine"] > 0.6 and h["participation_ratio"] < 2.5, h  # the collapsed run's regime
    msg = metrics.collapse_warning(collapsed, reference=healthy)
    assert msg and "collapsed" in msg and "learning rate" in msg and "temperature" in msg
    assert "untrained encoder: " in msg
    assert metrics.collapse_warning(h) == metrics.collapse_warning(collapsed)  # a matrix or its health
    assert metrics.collapse_warning(healthy) is None
    # A few dominant directions alone are no collapse: 4 well-separated clusters at +-e_1, +-e_2 have
    # a participation ratio near 2 and a mean cosine near 0 (the demo's stage 1: 2.5 and 0.25).
    clusters = np.concatenate([np.eye(100)[:2], -np.eye(100)[:2]] * 75) + 0.02 * rng.standard_normal((300, 100))
    assert metrics.participation_ratio(clusters) <= metrics.COLLAPSE_MAX_PR
    assert metrics.collapse_warning(clusters) is None
    # Nor is a shared offset direction alone while the rest stays spread over many directions
    # (the demo's stage 2: mean cosine 0.69, participation ratio 4.7).
    offset = _spread(k=8, spread=0.35)
    h = metrics.embedding_health(offset)
    assert h["mean_cosine"] >= metrics.COLLAPSE_MEAN_COSINE and h["participation_ratio"] > metrics.COLLAPSE_MAX_PR, h
    assert metrics.collapse_warning(offset) is None
    # Near-total collapse: one vector plus isotropic noise has a high participation ratio, and is warned.
    total = np.eye(100)[0] + 0.02 * rng.standard_normal((400, 100))
    assert metrics.participation_ratio(total) > 50 and metrics.collapse_warning(total)


def test_macro_f1_counts_a_predicted_class_absent_from_the_true_labels():
    """Bug checked (made by hand): with the classes taken from y_true alone, a class the probe
    predicts but no test song has dropped out of the mean, and macro-F1 rose.
    Hand-worked: true a a b b, predicted a c b b.
      a: tp 1, fp 0, fn 1 -> F1 2/3;  b: tp 2, fp 0, fn 0 -> 1;  c: tp 0, fp 1 -> 0
      macro-F1 = (2/3 + 1 + 0) / 3 = 5/9 (without c: 5/6)."""
    assert macro_f1(["a", "a", "b", "b"], ["a", "c", "b", "b"]) == pytest.approx(5 / 9)
    # sklearn's f1_score(average="macro") convention over the union of labels, as a brute-force loop
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 3, 40), rng.integers(0, 5, 40)  # classes 3, 4 only ever predicted
    f1s = []
    for c in sorted(set(y_true) | set(y_pred)):
        tp = sum((t == c) and (p == c) for t, p in zip(y_true, y_pred))
        fp = sum((t != c) and (p == c) for t, p in zip(y_true, y_pred))
        fn = sum((t == c) and (p != c) for t, p in zip(y_true, y_pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    assert macro_f1(y_true, y_pred) == pytest.approx(np.mean(f1s))
