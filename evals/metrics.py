"""The metrics every evaluation protocol shares, defined once, on plain arrays.

recall_at_k (pretrain.py's held-out retrieval), average_precision_at_k / map_at_k (CrossMuSim
mAP@K), ndcg_at_k (the artist graph's NDCG@200), auc (HTCL Table 2's CTR / CVR AUC and Figure 2's
separation), macro_f1 (the probe), cosine_topk (every exact nearest-neighbour search), the collapse measures
(participation_ratio, mean_pairwise_cosine, embedding_health, collapse_warning: training's
validation and `evaluate.py report` print them), and the
small helpers the protocols use to run and report: one_thread, progress_bar, mean_std,
plus_minus, markdown_table. Each metric is checked in tests/test_metrics.py against a brute-force
loop or a hand-worked value. No command of its own: every `python evaluate.py <sub-command>` uses it.
"""
import os
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def as_float_tensor(x):
    return x.detach().float() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x), dtype=torch.float32)


SCORE_BLOCK_BYTES = 2**30  # one (queries x keys) score block; with topk's copies the peak is ~2x this


def _rows_per_block(n_keys, batch_size):
    """Query rows per score block: batch_size, fewer when N keys would make the block exceed
    SCORE_BLOCK_BYTES (at 1M songs 1,024 rows were a 4 GB block and an 8.6 GB peak; bench.py)."""
    return max(1, min(batch_size, SCORE_BLOCK_BYTES // (4 * max(n_keys, 1))))


@torch.no_grad()
def recall_at_k(query_emb, key_emb, k, batch_size=1024):
    """Share of queries whose positive (key i for query i) is among the k most cosine-similar keys.

    query_emb, key_emb: (N, D) numpy arrays or torch tensors on any device -> float.
    Ties count against the query (rank = number of *other* keys scoring >= the
    positive), so a collapsed model that maps everything to one point scores 0,
    not 1.
    """
    q = F.normalize(as_float_tensor(query_emb), dim=-1)
    keys = F.normalize(as_float_tensor(key_emb), dim=-1).to(q.device)
    assert q.shape == keys.shape, f"recall_at_k needs paired rows, got {tuple(q.shape)} and {tuple(keys.shape)}"
    hits, batch_size = 0, _rows_per_block(keys.shape[0], batch_size)
    for start in range(0, q.shape[0], batch_size):
        s = q[start:start + batch_size] @ keys.T  # (b, N)
        i = torch.arange(s.shape[0], device=s.device)
        pos = s[i, i + start]  # the positive's score, from the same matmul so it ties with itself exactly
        rank = (s >= pos[:, None]).sum(1) - 1  # other keys at least as close
        hits += int((rank < k).sum())
    return hits / max(q.shape[0], 1)


def average_precision_at_k(relevant, n_relevant, k):
    """AP@k per query. relevant: (Q, >=k) bool, the ranked list's relevance; n_relevant: (Q,).

    AP@k = sum_{i<=k} P@i * rel_i / min(k, n_relevant): the normaliser is the most
    hits a list of k can hold, so a perfect list scores 1. Queries with no
    relevant item get NaN (the caller drops them).
    """
    rel = np.asarray(relevant, dtype=np.float64)[:, :k]
    n_relevant = np.asarray(n_relevant, dtype=np.float64)
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_relevant > 0, (precision * rel).sum(1) / np.minimum(k, n_relevant), np.nan)


def map_at_k(relevant, n_relevant, k):
    """Mean AP@k over queries that have at least one relevant item."""
    ap = average_precision_at_k(relevant, n_relevant, k)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def ndcg_at_k(relevant, n_relevant, k):
    """NDCG@k per query with binary gain and discount 1 / log2(rank + 1), rank from 1.

    relevant: (Q, >=k) bool ranked relevance; n_relevant: (Q,) -> (Q,), NaN where n_relevant = 0.
    The ideal list puts min(k, n_relevant) hits first.
    """
    rel = np.asarray(relevant, dtype=np.float64)[:, :k]
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # ranks 1..k
    dcg = (rel * discount[:rel.shape[1]]).sum(1)
    ideal = np.concatenate([[0.0], np.cumsum(discount)])[np.minimum(np.asarray(n_relevant), k)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg / ideal, np.nan)


def auc(scores, labels):
    """ROC AUC = P(score of a random positive > score of a random negative), ties count 1/2.

    Computed from average ranks (Mann-Whitney U), O(n log n). NaN when one class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank shared by each group of ties
    ranks = avg_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_f1(y_true, y_pred):
    """Unweighted mean F1 over the classes present in y_true or y_pred (sklearn's convention)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    f1s = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")


@torch.no_grad()
def cosine_topk(queries, keys, k, exclude=None, batch_size=1024, progress=None, groups=None):
    """Top-k keys by cosine for each query, in blocks of rows so memory stays ~SCORE_BLOCK_BYTES.

    queries (Q, D), keys (N, D) -> (scores (Q, k), indices (Q, k)) torch tensors, best first.
    exclude: (Q,) key index that query q may not retrieve (itself, when the queries are songs
    of the catalog being searched).
    groups: (query_groups (Q,), key_groups (N,)) int codes, -1 = none: query q may not retrieve
    a key of its own group (evaluate.py retrieval --exclude_same). Such keys score -inf, so
    they come last; a caller whose k exceeds the allowed keys must ignore -inf scores.
    """
    q = F.normalize(as_float_tensor(queries), dim=-1)
    keys = F.normalize(as_float_tensor(keys), dim=-1)
    k = min(k, keys.shape[0] - (exclude is not None))
    scores, indices, batch_size = [], [], _rows_per_block(keys.shape[0], batch_size)
    for start in range(0, q.shape[0], batch_size):
        s = q[start:start + batch_size] @ keys.T  # (b, N)
        if exclude is not None:
            s[torch.arange(s.shape[0]), torch.as_tensor(exclude[start:start + batch_size])] = -float("inf")
        if groups is not None:
            qg = torch.as_tensor(groups[0][start:start + batch_size])[:, None]  # (b, 1)
            s[(qg == torch.as_tensor(groups[1])[None, :]) & (qg >= 0)] = -float("inf")
        v, j = s.topk(k, dim=1)
        scores.append(v)
        indices.append(j)
        if progress is not None:
            progress.update(s.shape[0])
    return torch.cat(scores), torch.cat(indices)


# -----------------------------------------------------------------------------
# Collapse: are the song embeddings still spread out? Printed by the validation of both stages
# (pretrain.validate) and by `evaluate.py report`, beside the untrained encoder's where known.


def _unit_rows(x):
    """(N, D) -> float64 numpy rows of unit length (a zero row stays zero)."""
    x = x.detach().double().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def participation_ratio(x):
    """(sum of eigenvalues)^2 / (sum of squared eigenvalues) of the covariance of the L2-normalised
    rows of x (N, D): ~1 when one direction holds all the variance, D when it is spread evenly.
    Computed from the trace and Frobenius norm of the D x D covariance (no eigendecomposition)."""
    u = _unit_rows(x)
    u = u - u.mean(0)
    cov = u.T @ u  # (D, D); the 1 / (N - 1) cancels in the ratio
    denom = float((cov * cov).sum())
    return float(np.trace(cov) ** 2 / denom) if denom > 0 else 0.0


def mean_pairwise_cosine(x):
    """Mean cosine over the N (N - 1) ordered pairs of distinct rows of x (N, D), in O(N D):
    sum_{i != j} u_i . u_j = |sum_i u_i|^2 - sum_i |u_i|^2 for unit rows u."""
    u = _unit_rows(x)
    n = len(u)
    if n < 2:
        return float("nan")
    total = u.sum(0)
    return float((total @ total - (u * u).sum()) / (n * (n - 1)))


def embedding_health(x):
    """{"participation_ratio", "mean_cosine"} of an embedding matrix (N, D)."""
    return {"participation_ratio": participation_ratio(x), "mean_cosine": mean_pairwise_cosine(x)}


# The collapse rule (collapse_warning): both a raised mean pairwise cosine and a low participation
# ratio. Calibrated on three kinds of run (docs/EXPERIMENTS.md, 2026-12-04):
# - collapsed (probe and same-work retrieval below the untrained encoder's): the user's run of 1,358
#   real clips (mean cosine 0.61 / 0.78 after stage 1 / 2, participation ratio 2.1, search scores
#   0.9997-1.0) and our real-music corpus at lr 1e-3 (participation ratio 1.8-2.6, mean cosine
#   0.44-0.58);
# - healthy on that corpus (lr 1e-4: above the untrained encoder on both): ratio 3.5-5.0, cosine 0.12-0.43;
# - the healthy demo (sample_data/demo.sh): stage 1 ratio 2.5 with cosine 0.25, stage 2 4.7 with 0.69.
# Either measure alone would flag a healthy demo stage: a low participation ratio alone is not
# collapse (a few dominant directions can still separate genres), nor is a common offset direction
# (a high mean cosine, which the ranking by cosine barely feels) while the rest stays spread.
# Nearest-neighbour cosines do not tell them apart either (the demo's median top-1 is 0.9988).
# A near-total collapse (every song almost one vector) leaves only noise, which can be spread
# evenly: at or above COLLAPSE_TOTAL_MEAN_COSINE the spectrum is not asked (the untrained
# encoders: 0.84-0.91; the trained demo stages: 0.25, 0.69).
COLLAPSE_MEAN_COSINE = 0.4         # collapsed: mean pairwise cosine at or above this ...
COLLAPSE_MAX_PR = 3.0              # ... and participation ratio at or below this
COLLAPSE_TOTAL_MEAN_COSINE = 0.95  # or mean pairwise cosine at or above this, whatever the spectrum
COLLAPSE_CAUSES = ("the learning rate too high for the batch size (--lr, --global_batch)",
                   "too many steps for a small catalog (--epochs x songs / --global_batch)",
                   "a temperature that ran to its bound (temp in the log lines; --model.logit_scale_max)",
                   "a text tower that gives every song nearly the same vector (--model.text_pooling, "
                   "text_mean_cos in the validation line)")


def collapse_warning(emb, reference=None, name="audio embeddings", reference_name="untrained encoder"):
    """One warning line when `emb` (an (N, D) matrix, or embedding_health's dict of one) looks
    collapsed by the rule above, else None. reference: the same for the untrained encoder (matrix
    or dict), quoted beside the numbers when given; it does not change the verdict."""
    h = emb if isinstance(emb, dict) else embedding_health(emb)
    pr, cos = h["participation_ratio"], h["mean_cosine"]
    if not (cos >= COLLAPSE_MEAN_COSINE and pr <= COLLAPSE_MAX_PR or cos >= COLLAPSE_TOTAL_MEAN_COSINE):
        return None
    ref = ""
    if reference is not None:
        r = reference if isinstance(reference, dict) else embedding_health(reference)
        ref = f" ({reference_name}: {r['participation_ratio']:.1f}, {r['mean_cosine']:.2f})"
    return (f"WARNING: the {name} look collapsed: participation ratio {pr:.1f}, mean pairwise cosine "
            f"{cos:.2f}{ref} (rule: mean cosine >= {COLLAPSE_MEAN_COSINE} and participation ratio <= "
            f"{COLLAPSE_MAX_PR:g}, or mean cosine >= {COLLAPSE_TOTAL_MEAN_COSINE}: what varies between songs lies "
            "in a few directions around one they share). "
            "Likely causes: " + "; ".join(COLLAPSE_CAUSES) + ". Compare with the untrained encoder: "
            "evaluate.py probe/report --baselines")


def available_cores():
    """CPU cores this process may run on (its affinity; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def one_thread():
    """Train the small evaluation models (probe, DIN, GraphSAGE) on one intra-op thread.
    Their matmuls are too small to split, and on a busy 2-core machine waiting for a
    descheduled second thread made training 10x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def plus_minus(mean_std_pair, digits=4):
    """(mean, std) -> "mean ± std", the cell format of every table with seeds."""
    m, s = mean_std_pair
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def progress_bar(total, desc):
    # disable=None: shown on a terminal, silent in logs and tests
    return tqdm(total=total, desc=desc, unit="song", file=sys.stderr, mininterval=1.0, disable=None)
