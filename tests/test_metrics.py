"""Tests of evals/metrics.py: Recall@K, mAP@K, NDCG@K, AUC and macro-F1 against brute-force loops
and hand-worked cases, and the score blocks that bound retrieval's memory.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_metrics.py
"""
import math

import numpy as np
import pytest
import torch

from evals import metrics
from evals.metrics import macro_f1

from tests.helpers import _unit


def test_recall_at_k_matches_brute_force():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((57, 8)), rng.standard_normal((57, 8))
    k[:20] = q[:20] + 0.3 * rng.standard_normal((20, 8))  # some queries find their positive
    sims = _unit(q) @ _unit(k).T
    for K in (1, 5, 10):
        brute = np.mean([i in np.argsort(-sims[i], kind="stable")[:K] for i in range(57)])
        assert metrics.recall_at_k(q, k, K, batch_size=16) == pytest.approx(brute)
        assert metrics.recall_at_k(torch.tensor(q), torch.tensor(k), K) == pytest.approx(brute)  # torch input too


def test_score_blocks_follow_the_memory_budget(monkeypatch):
    """With a budget of 5 rows of scores, retrieval runs in blocks of 5 and finds the same neighbours."""
    rng = np.random.default_rng(1)
    q, keys = rng.standard_normal((23, 8)), rng.standard_normal((57, 8))
    full_s, full_i = metrics.cosine_topk(q, keys, 7)
    rec = metrics.recall_at_k(q, keys[:23], 3)
    monkeypatch.setattr(metrics, "SCORE_BLOCK_BYTES", 4 * 57 * 5)
    assert metrics._rows_per_block(57, 1024) == 5 and metrics._rows_per_block(57, 2) == 2
    assert metrics._rows_per_block(10**9, 1024) == 1  # never 0 rows
    s, i = metrics.cosine_topk(q, keys, 7)
    brute = np.argsort(-(_unit(q) @ _unit(keys).T), axis=1, kind="stable")[:, :7]
    assert torch.equal(i, full_i) and torch.allclose(s, full_s, atol=1e-6) and (i.numpy() == brute).all()
    assert metrics.recall_at_k(q, keys[:23], 3) == rec


def test_recall_at_k_of_a_collapsed_model_is_zero():
    same = np.ones((10, 4))
    assert metrics.recall_at_k(same, same, 1) == 0.0  # ties count against the query


def test_map_at_k_hand_worked():
    # ranked list: hit, miss, hit, miss; 3 relevant in total; k = 4
    # AP = (P@1 + P@3) / min(4, 3) = (1 + 2/3) / 3
    assert metrics.map_at_k([[1, 0, 1, 0]], [3], 4) == pytest.approx((1 + 2 / 3) / 3)
    # a perfect list with fewer relevant than k scores 1; a query with none is left out
    assert metrics.map_at_k([[1, 1, 0, 0], [0, 0, 0, 0]], [2, 0], 4) == pytest.approx(1.0)
    # only the first k positions count
    assert metrics.map_at_k([[0, 1, 1]], [2], 2) == pytest.approx(0.5 / 2)


def test_map_at_k_matches_loop():
    rng = np.random.default_rng(1)
    rel = rng.random((30, 12)) < 0.3
    n_rel = rel.sum(1) + rng.integers(0, 4, 30)
    loop = []
    for r, n in zip(rel, n_rel):
        if n == 0:
            continue
        hits, total = 0, 0.0
        for i in range(10):
            if r[i]:
                hits += 1
                total += hits / (i + 1)
        loop.append(total / min(10, n))
    assert metrics.map_at_k(rel, n_rel, 10) == pytest.approx(np.mean(loop))


def test_ndcg_at_k_hand_worked():
    # relevant at ranks 2 and 3, two relevant in total: DCG = 1/log2(3) + 1/log2(4), IDCG = 1 + 1/log2(3)
    dcg, idcg = 1 / math.log2(3) + 0.5, 1 + 1 / math.log2(3)
    assert metrics.ndcg_at_k([[0, 1, 1]], [2], 3)[0] == pytest.approx(dcg / idcg)
    # a relevant item below the cut-off adds nothing to DCG but still counts in the ideal
    assert metrics.ndcg_at_k([[1, 0, 0]], [5], 3)[0] == pytest.approx(1 / (1 + 1 / math.log2(3) + 0.5))
    assert np.isnan(metrics.ndcg_at_k([[0, 0]], [0], 2)[0])


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(5):
        scores = rng.integers(0, 6, 80).astype(float)  # many ties
        labels = rng.random(80) < 0.4
        pos, neg = scores[labels], scores[~labels]
        pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert metrics.auc(scores, labels) == pytest.approx(pairwise)
    assert metrics.auc([0.1, 0.9, 0.4], [0, 1, 0]) == 1.0
    assert np.isnan(metrics.auc([0.1, 0.2], [1, 1]))


def test_macro_f1_hand_worked():
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 2, 1, 0, 0]
    # class 0: tp 1 (i0), fp 2 (i3, i4), fn 1 (i1) -> 2/(2+2+1); class 1: tp 1, fp 0, fn 1 (i3) -> 2/3
    # class 2: tp 0 -> 0
    expected = np.mean([2 / 5, 2 / 3, 0.0])
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx(expected)


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
    # The real-music corpus's collapse at lr 1e-3 (ratio 1.8-2.6, mean cosine 0.44-0.58) is warned;
    # the same spectrum around a weaker shared direction (the demo's stage 1: 2.5, 0.25) is not.
    corpus = _spread(shared=0.7)
    h = metrics.embedding_health(corpus)
    assert 0.44 <= h["mean_cosine"] <= 0.58 and h["participation_ratio"] <= 2.6, h
    assert metrics.collapse_warning(corpus)
    demo1 = _spread(shared=0.5, spread=0.8)
    h = metrics.embedding_health(demo1)
    assert 0.2 <= h["mean_cosine"] <= 0.3 and h["participation_ratio"] <= 2.6, h
    assert metrics.collapse_warning(demo1) is None
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
