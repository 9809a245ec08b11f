"""Tests of evals/metrics.py beyond test_smoke.py's: macro-F1 counts every class predicted, not
only those in the true labels. Run from the repo root:

    python -m pytest -q tests/test_metrics.py
"""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evals.metrics import macro_f1  # noqa: E402


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
