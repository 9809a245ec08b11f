"""Every evaluation protocol of the three papers, on plain song-embedding matrices.

Where each protocol lives (paper, section -> sub-command: functions):

  HTCL Sec. 3.1.3 semantic tasks, MLP probe ACC      -> probe:        run_probe
  HTCL Sec. 3.1.3 matching, next-item HR@100         -> matching:     sample_matching_cases, matching_hits
  HTCL Sec. 3.1.3 ranking, DIN CTR / CVR AUC         -> ranking:      build_din_examples, DIN, run_ranking
  HTCL Figure 2, cosine of favoured vs not           -> distance:     pair_cosines, separation, plot_histograms
  CrossMuSim M2M mAP@100, T2M R@1/R@5/mAP@10,        -> retrieval:    music_to_music_map, text_to_music,
    same-artist leakage                                               same_artist_stats
  Grotschla et al. (MuRS 2024) GraphSAGE NDCG@200    -> artist-graph: message_passing_graphs, ArtistGNN,
    (the authors' released protocol)                                  train_artist_gnn, artist_graph_ndcg
  HTCL Table 2 and Figure 2 in one go                -> report:       report
  Table 2 as mean ± std over seeds, with targets     -> table2:       table2_over_seeds (sample_data/table2.sh)
  song embeddings, full song or 10 s chunks          -> embed:        embed_catalog
  similar songs for audio files or song ids          -> search:       embed_audio_files, search, build_index

The metrics (recall_at_k, map_at_k, ndcg_at_k, auc, macro_f1) are pure functions, each
tested against a brute-force loop or a hand-worked value. pretrain.py imports recall_at_k.

Embeddings: every sub-command takes `--emb SPEC` (repeat it to compare models), SPEC one of
  a folder from `embed`   ids.txt (one song_id a line) + audio.npy, and text.npy / fused.npy
                          when asked for; --kind picks one (default audio)
  NAME.npy                float32 (N, D) with NAME.ids.txt beside it, one song_id a line in
                          row order: how any other model (a baseline) is evaluated
  an artifact folder      pretrain.py / finetune.py output (config.json): embedded on the fly
  random[:D]              seeded Gaussian vectors, D = 100 by default: the chance baseline
Rows are matched to the catalog by song_id; a catalog song without an embedding is an error.

Commands (from the repo root, on the bundled synthetic world; A = a trained artifact folder):
  python evaluate.py embed --artifact A --catalog sample_data/catalog.csv --out emb/htcl --text --fused
  python evaluate.py embed --artifact A --catalog sample_data/catalog.csv --out emb/htcl10s --mode chunked
  python evaluate.py probe --catalog sample_data/catalog.csv --emb emb/htcl --emb random --label genre
  python evaluate.py matching --catalog sample_data/catalog.csv --emb emb/htcl --favourites sample_data/favourites.csv
  python evaluate.py ranking --catalog sample_data/catalog.csv --emb emb/htcl --emb random \
      --impressions sample_data/impressions.csv
  python evaluate.py distance --catalog sample_data/catalog.csv --emb emb/clap --emb emb/htcl \
      --impressions sample_data/impressions.csv --out figure2.png        # or --pairs anchor,song,label CSV
  python evaluate.py retrieval --catalog sample_data/catalog.csv --emb emb/htcl --tag genre --artifact A
  python evaluate.py artist-graph --catalog sample_data/catalog.csv --emb emb/htcl --features mean \
      --features random --edges sample_data/artist_graph.csv --artist-split sample_data/artist_split.csv
  python evaluate.py report --catalog sample_data/catalog.csv --emb emb/clap --emb emb/htcl \
      --favourites sample_data/favourites.csv --impressions sample_data/impressions.csv --out report/
  python evaluate.py matching-benchmark      # HR@100 timing at 100k songs x 10k users, random vectors
  python evaluate.py embed --artifact A --catalog sample_data/catalog.csv --out emb/htcl [--index faiss]
  python evaluate.py search --model A --catalog sample_data/catalog.csv --emb emb/htcl \
      --query my_song.wav --query s0001 --k 10 [--index faiss] [--out similar.csv]
  python evaluate.py table2 runs/table2/s3407/report runs/table2/s3408/report --out runs/table2  # over seeds
Every sub-command prints a Markdown table and its wall time; --json FILE saves the numbers;
-h shows every option with its default. A bad file, row, key or value stops the command line with
one `Error: ...` line naming it (exit 1), as data.py does; report prints a line per protocol and model.

Similar songs from Python (the search sub-command does this):
  import evaluate as ev
  from data import load_catalog
  from model import load_artifact
  model, tokenizer = load_artifact("runs/demo/finetune/final")
  ids, keys = ev.load_embeddings("emb/htcl")           # or ev.embed_catalog(model, tokenizer, catalog)["audio"]
  query = ev.embed_audio_files(model, ["my_song.wav"])  # (1, D), normalized
  scores, rows = ev.search(query, keys, k=10)           # index=ev.build_index(keys): FAISS (pip install faiss-cpu)
  catalog = load_catalog("sample_data/catalog.csv")
  for score, row in zip(scores[0], rows[0]):
      song = catalog[catalog.index[ids[row]]]
      print(f"{score:.3f}  {song.song_id}  {song.title} - {song.artists}")
"""
import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import sys
import threading
import time
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import (HOP_LENGTH, MIN_FRAMES, SAMPLE_RATE, Collator, MelCache, SongDataset, load_catalog,
                  load_favourites, seconds_to_frames, song_mel, split_rows)
from data import _read_records  # the CSV/JSONL reader whose errors name file, line and column
from model import load_artifact

# -----------------------------------------------------------------------------
# Metrics. Each takes plain arrays and is checked in the tests against a
# brute-force loop or a hand-worked example.


def _as_float_tensor(x):
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
    q = F.normalize(_as_float_tensor(query_emb), dim=-1)
    keys = F.normalize(_as_float_tensor(key_emb), dim=-1).to(q.device)
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
    a key of its own group (evaluate.py retrieval --exclude-same). Such keys score -inf, so
    they come last; a caller whose k exceeds the allowed keys must ignore -inf scores.
    """
    q = F.normalize(_as_float_tensor(queries), dim=-1)
    keys = F.normalize(_as_float_tensor(keys), dim=-1)
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


# Models built from the global RNG (torch.manual_seed(seed), then the module) are built under this
# lock: report() trains probes and DIN models on several threads at once, and a seed is only
# reproducible if no other thread draws between the seeding and the last initial weight.
_SEEDED_INIT = threading.Lock()


def available_cores():
    """CPU cores this process may run on (its affinity; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


# -----------------------------------------------------------------------------
# Semantic tasks (HTCL Sec. 3.1.3): a single-layer MLP on frozen embeddings,
# accuracy for genre and for language.


# The probe's optimizer. The probes were most of the demo report's time (1000 steps at lr 1e-3
# per label, model and seed). At 3x the lr, 300 steps give the same accuracy on the demo's 6
# (model, label) probes within 0.010 (0.015 with fused AdamW; one of its 66 test songs is 0.015;
# std over seeds 0.00-0.045), in 0.3 of the time; 200 steps at lr 1e-3 moved genre ACC by -0.043
# and +0.049 (README, Evaluation).
PROBE_LR = 3e-3
PROBE_MIN_STEPS = 300


class Probe(nn.Module):
    """Standardize -> Linear -> ReLU -> Linear: an MLP with one hidden layer; AdamW's weight decay regularizes.

    NOTE(paper): "a single-layer MLP" is read as one hidden layer (width 512);
    --hidden 0 gives a linear (logistic-regression) probe instead. The input is
    standardized with the training set's mean and std so that embeddings of any
    scale (another model's, unnormalized) meet the same optimizer settings.
    """

    def __init__(self, mean, std, n_classes, hidden=512):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        d = mean.shape[0]
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
        else:
            self.net = nn.Linear(d, n_classes)

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


@one_thread()
def train_probes(x_train, y_train, x_test, n_classes, seeds=(0,), hidden=512, epochs=100, lr=PROBE_LR,
                 weight_decay=1e-4, batch_size=256, min_steps=PROBE_MIN_STEPS):
    """Fit one Probe per seed on (x_train, y_train) -> [class predictions for x_test (numpy int)], one per seed.

    Each seed's probe has its own initialization (Probe built after torch.manual_seed(seed)) and its
    own batch order (a generator seeded with seed). They train side by side as one batched model:
    the loss is the sum of the seeds' losses, so each probe's gradient is its own, and AdamW works
    element by element, so this is training them one after another with 1/len(seeds) of the steps
    (the report's probes were most of its time: 5 seeds x 1000 small steps per label and model).
    Small training sets get more epochs, up to min_steps optimizer steps, so that a
    few hundred songs are not under-fitted where 30k would not be (see PROBE_LR).
    """
    x_train = torch.as_tensor(x_train, dtype=torch.float32)
    y_train = torch.as_tensor(y_train, dtype=torch.long)
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False) + 1e-6
    probes = []
    with _SEEDED_INIT:
        for seed in seeds:
            torch.manual_seed(seed)
            probes.append(Probe(mean, std, n_classes, hidden))
    # Each Linear, stacked over seeds: weight (S, in, out) for baddbmm, bias (S, 1, out).
    layers = zip(*[[m for m in p.net.modules() if isinstance(m, nn.Linear)] for p in probes])
    params = []
    for layer in layers:
        params += [nn.Parameter(torch.stack([m.weight.detach().T for m in layer]).contiguous()),
                   nn.Parameter(torch.stack([m.bias.detach() for m in layer])[:, None, :])]

    def forward(x):  # (S, b, D) -> (S, b, n_classes); Probe.forward for every seed at once
        h = (x - mean) / std
        for i in range(0, len(params), 2):
            h = torch.baddbmm(params[i + 1], F.relu(h) if i else h, params[i])
        return h

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)  # one kernel for all tensors
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    epochs = max(epochs, math.ceil(min_steps / math.ceil(len(x_train) / batch_size)))
    for _ in range(epochs):
        orders = [torch.randperm(len(x_train), generator=g).split(batch_size) for g in generators]
        for idx in zip(*orders):
            idx = torch.stack(idx)  # (S, b): every seed's batch has the same size
            logits = forward(x_train[idx])
            # sum over seeds of each seed's mean cross-entropy
            loss = F.cross_entropy(logits.flatten(0, 1), y_train[idx].flatten(), reduction="sum") / idx.shape[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        x_test = torch.as_tensor(x_test, dtype=torch.float32)
        return list(forward(x_test.expand(len(seeds), *x_test.shape)).argmax(-1).numpy())


def train_probe(x_train, y_train, x_test, n_classes, seed=0, **kw):
    """One probe: train_probes with a single seed."""
    return train_probes(x_train, y_train, x_test, n_classes, seeds=(seed,), **kw)[0]


def run_probe(emb, labels, split=None, train_split="train", test_split="test", seeds=(0, 1, 2, 3, 4),
              test_fraction=0.2, **train_kw):
    """Probe accuracy and macro-F1, mean +- std over seeds.

    emb: (N, D); labels: N strings ("" = no label, the song is left out).
    split: N strings; rows equal to train_split train, test_split test. Without it,
    each seed draws its own random split with test_fraction held out.
    Returns {"acc": (mean, std), "macro_f1": (mean, std), "n_train", "n_test", "n_classes",
    "majority" (share of the commonest training label), ...}.
    """
    emb = np.asarray(emb, dtype=np.float32)
    labels = np.asarray(labels, dtype=object)
    has_label = labels != ""
    # Seeds that share a split train together (train_probes); a random split is drawn per seed.
    if split is not None:
        split_arr = np.asarray(split, dtype=object)
        groups = [(list(seeds), has_label & (split_arr == train_split), has_label & (split_arr == test_split))]
    else:
        groups = []
        for seed in seeds:
            is_test = np.random.default_rng(seed).random(len(labels)) < test_fraction
            groups.append(([seed], has_label & ~is_test, has_label & is_test))
    accs, f1s = [], []
    for group, train, test in groups:
        if train.sum() == 0 or test.sum() == 0:
            raise ValueError(f"probe needs both splits non-empty: {train.sum()} train rows "
                             f"('{train_split}'), {test.sum()} test rows ('{test_split}')")
        classes = sorted(set(labels[train]))
        index = {c: i for i, c in enumerate(classes)}
        # A test label never seen in training cannot be predicted: it stays in the
        # denominator (counted wrong) rather than being dropped.
        y_test = np.array([index.get(c, -1) for c in labels[test]])
        for y_pred in train_probes(emb[train], [index[c] for c in labels[train]], emb[test], len(classes),
                                   seeds=group, **train_kw):
            accs.append(float((y_pred == y_test).mean()))
            f1s.append(macro_f1(y_test, y_pred))
    unseen = int((y_test == -1).sum())
    counts = np.unique(labels[train], return_counts=True)[1]
    return {"acc": mean_std(accs), "macro_f1": mean_std(f1s), "n_train": int(train.sum()),
            "n_test": int(test.sum()), "n_classes": len(classes), "unseen_test_labels": unseen,
            "majority": float(counts.max() / counts.sum()), "per_seed_acc": accs}


# -----------------------------------------------------------------------------
# Matching (HTCL Sec. 3.1.3): next-item prediction, HR@100.
# For each user: one favoured song, drawn with a seed, is the target; the 30
# songs favoured just before it are the triggers; each trigger retrieves its 10
# nearest songs by cosine (triggers excluded); the candidates are merged into
# one list of 100; a hit is the target being on that list.
# NOTE(paper): the paper does not say how the <= 300 candidates become 100, nor
# which favourites may be the target. Our reading, each part a CLI option:
#   --merge best         a candidate's score is its best cosine to any trigger;
#                        the 100 best distinct candidates form the list (default)
#   --merge round-robin  rank 1 of every trigger (most recent trigger first), then rank 2, ...
#   target: uniform over the favourites that have >= 30 distinct favourites before them;
#   a user's repeated favourite of the same song counts once (its first time).


def sample_matching_cases(favourites, n_triggers=30, seed=0):
    """favourites: (user_id, row, timestamp) sorted by user, then time (data.load_favourites).

    -> triggers (U, n_triggers) long, oldest first; targets (U,) long; users (list of U ids);
       stats {"users", "eligible", "duplicates"}.
    """
    by_user = defaultdict(list)
    for user, row, _ in favourites:
        by_user[user].append(row)
    rng = np.random.default_rng(seed)
    triggers, targets, users, duplicates = [], [], [], 0
    for user in sorted(by_user):
        rows = list(dict.fromkeys(by_user[user]))  # first favour of each song, in time order
        duplicates += len(by_user[user]) - len(rows)
        if len(rows) <= n_triggers:
            continue
        t = int(rng.integers(n_triggers, len(rows)))  # the target's position; n_triggers songs precede it
        triggers.append(rows[t - n_triggers:t])
        targets.append(rows[t])
        users.append(user)
    stats = {"users": len(by_user), "eligible": len(users), "duplicates": duplicates}
    triggers = torch.tensor(triggers, dtype=torch.long).reshape(-1, n_triggers)
    return triggers, torch.tensor(targets, dtype=torch.long), users, stats


@torch.no_grad()
def matching_hits(emb, triggers, targets, per_trigger=10, list_size=100, merge="best", batch_size=1024,
                  progress=True, index=None):
    """Whether each user's target is on the merged candidate list. -> (U,) bool tensor.

    emb: (N, D) song embeddings; triggers: (U, T) song rows; targets: (U,) song rows.
    Two phases, so that the cost is one (unique triggers x N) matmul whatever U is:
      1. the top (per_trigger + T) neighbours of every distinct trigger song, by
         cosine. Excluding a user's T triggers removes at most T of them, so the
         first per_trigger survivors are exactly that user's top per_trigger.
      2. per batch of users: drop each user's triggers, keep per_trigger per
         trigger, merge by the rule, check the target.
    index: a FAISS index over emb (rows in emb's order) for phase 1, None for exact search.
    """
    U, T = triggers.shape
    if U == 0:
        return torch.zeros(0, dtype=torch.bool)
    unique, position = torch.unique(triggers, return_inverse=True)  # position: (U, T) into unique
    bar = _progress(len(unique), "matching: neighbours of trigger songs") if progress else None
    nb_score, nb_index = neighbours(_as_float_tensor(emb)[unique], emb, per_trigger + T, index, batch_size,
                                    progress=bar)
    if bar is not None:
        bar.close()
    hits = []
    for start in range(0, U, batch_size):
        trig = triggers[start:start + batch_size]  # (B, T)
        idx = nb_index[position[start:start + batch_size]]  # (B, T, K) candidates, best first
        score = nb_score[position[start:start + batch_size]]
        is_trigger = (idx[..., None] == trig[:, None, None, :]).any(-1)  # (B, T, K)
        rank = torch.cumsum(~is_trigger, dim=2) - 1  # rank among the surviving candidates
        keep = ~is_trigger & (rank < per_trigger) & (idx >= 0)  # -1: a slot an approximate index left empty
        # Each rule orders candidates by a key, smaller first.
        if merge == "best":
            key = -score
        elif merge == "round-robin":
            recency = torch.arange(T - 1, -1, -1)[None, :, None]  # triggers are oldest first; newest goes first
            key = (rank * T + recency).float()
        else:
            raise ValueError(f"unknown merge rule {merge!r} (best, round-robin)")
        key = torch.where(keep, key, torch.full_like(key, float("inf"))).flatten(1)  # (B, T*K)
        idx = idx.flatten(1)
        # A song retrieved by several triggers keeps its smallest key: sort by key,
        # then stably by song, so each song's best entry comes first in its run.
        order = key.argsort(dim=1, stable=True)
        key, idx = key.gather(1, order), idx.gather(1, order)
        order = idx.argsort(dim=1, stable=True)
        key, idx = key.gather(1, order), idx.gather(1, order)
        repeat = torch.zeros_like(idx, dtype=torch.bool)
        repeat[:, 1:] = idx[:, 1:] == idx[:, :-1]
        key = key.masked_fill(repeat, float("inf"))
        top_key, top = key.topk(min(list_size, key.shape[1]), dim=1, largest=False)
        listed = idx.gather(1, top).masked_fill(top_key.isinf(), -1)  # (B, list_size) song rows, -1 = empty slot
        hits.append((listed == targets[start:start + batch_size, None]).any(1))
    return torch.cat(hits)


def matching_chance(n_songs, n_triggers=30, per_trigger=10, list_size=100):
    """HR of a list drawn at random: the target is one of the n_songs - n_triggers songs that are not
    triggers, and the list holds at most min(list_size, n_triggers * per_trigger) of them. Never above 1."""
    pool = max(n_songs - n_triggers, 1)
    return min(list_size, n_triggers * per_trigger, pool) / pool


def _progress(total, desc):
    # disable=None: shown on a terminal, silent in logs and tests
    return tqdm(total=total, desc=desc, unit="song", file=sys.stderr, mininterval=1.0, disable=None)


def matching_benchmark(n_songs=100_000, n_users=10_000, dim=100, n_triggers=30, seed=0):
    """Wall time of matching_hits on random unit vectors and random histories (the issue's 100k x 10k)."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n_songs, dim, generator=g), dim=1)
    history = torch.randint(n_songs, (n_users, n_triggers + 1), generator=g)  # rare repeats only cost a miss
    t0 = time.time()
    hits = matching_hits(emb, history[:, :-1], history[:, -1])
    seconds = time.time() - t0
    return {"songs": n_songs, "users": n_users, "dim": dim, "threads": torch.get_num_threads(),
            "seconds": seconds, "hr@100": float(hits.float().mean())}


# -----------------------------------------------------------------------------
# Ranking (HTCL Sec. 3.1.3): DIN (Zhou et al., KDD 2018) for CTR and CVR, item
# embeddings initialized from the music representations, trained on days 1-7 of
# an impressions log and scored by AUC on day 8.
# Our reading of what the paper leaves open:
#   CTR: every impression, label = clicked.
#   CVR: only clicked impressions, label = favoured (post-click conversion).
#   behaviour sequence of an impression on day d: the user's clicked songs on days
#   before d (--behaviour favoured: their favoured songs), most recent 50 kept.
#   NOTE(paper): the production DIN also sees user and context features we do not
#   have; ours sees only the behaviour sequence and the target song, so the item
#   embeddings carry the comparison between representations.


def build_din_examples(user_ids, rows, days, clicked, favoured, task="ctr", behaviour="clicked", max_len=50):
    """Impressions (parallel arrays) -> {"target" (M,), "history" (M, L) song rows with -1 as
    padding, "label" (M,), "day" (M,)}.

    Within a day, impression order is unknown, so only earlier days form the history:
    nothing of the impression's own day leaks into its features.
    """
    user_ids, rows, days = np.asarray(user_ids, dtype=object), np.asarray(rows), np.asarray(days)
    clicked, favoured = np.asarray(clicked).astype(bool), np.asarray(favoured).astype(bool)
    acted = {"clicked": clicked, "favoured": favoured}[behaviour]
    if task == "ctr":
        label, use = clicked, np.ones(len(rows), dtype=bool)
    elif task == "cvr":
        label, use = favoured, clicked
    else:
        raise ValueError(f"unknown task {task!r} (ctr, cvr)")
    history = np.full((len(rows), max_len), -1, dtype=np.int64)
    users = user_ids.astype(str)
    order = np.argsort(users, kind="stable")  # group impressions by user
    bounds = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        _fill_history(history, order[a:b], rows, days, acted, max_len)
    return {"target": torch.as_tensor(rows[use], dtype=torch.long),
            "history": torch.as_tensor(history[use]),
            "label": torch.as_tensor(label[use], dtype=torch.float32),
            "day": torch.as_tensor(days[use], dtype=torch.long)}


def _fill_history(history, mine, rows, days, acted, max_len):
    """history[i] = the last max_len acted-on songs of this user on days before days[i]."""
    events = mine[acted[mine]]
    events = events[np.argsort(days[events], kind="stable")]  # by day, file order within a day
    n_before = np.searchsorted(days[events], days[mine], side="left")  # events strictly before each day
    for i, n in zip(mine, n_before):
        seq = rows[events[max(0, n - max_len):n]]
        history[i, max_len - len(seq):] = seq  # right-aligned, most recent last


def _mlp(dims, activation=nn.PReLU):
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class DIN(nn.Module):
    """Deep Interest Network (Zhou et al., KDD 2018), the compact form.

    target (B,) song rows, history (B, L) song rows with -1 as padding -> logit (B,).
        weight_i = a(h_i, t) = MLP([h_i, t, h_i - t, h_i * t])   the activation unit (DIN Fig. 3)
        interest = sum_i weight_i * h_i                          no softmax: DIN keeps the intensity of interest
        logit    = MLP([interest, t, interest * t])
    NOTE(paper): DIN's Dice activation is replaced by PReLU (DIN's own baseline activation).
    """

    def __init__(self, item_emb, attention_hidden=(80, 40), hidden=(200, 80), freeze_items=False):
        super().__init__()
        n, d = item_emb.shape
        self.n_items = n
        weight = torch.cat([torch.as_tensor(item_emb, dtype=torch.float32), torch.zeros(1, d)])  # last row: padding
        self.items = nn.Embedding.from_pretrained(weight, freeze=freeze_items, padding_idx=n)
        self.attention = _mlp([4 * d, *attention_hidden, 1])
        self.head = _mlp([3 * d, *hidden, 1])

    def forward(self, target, history):
        # The activation unit runs on real history entries only, packed: (B, L) with -1 padding ->
        # n = number of real entries. A padded position's weight is 0 whatever the attention says,
        # so this is the same function; on the demo's logs (15 real songs of 50 on average) it
        # skips 70% of the work.
        b, l = (history >= 0).nonzero(as_tuple=True)  # (n,), (n,): row and position of each real entry
        songs = history[b, l]  # (n,)
        t = self.items(target)  # (B, D)
        h = self.items(songs)  # (n, D)
        # The activation unit's first layer on [h, t, h - t, h * t], rearranged: with its weight's
        # four (hidden, D) blocks W_h, W_t, W_d, W_p it is h (W_h + W_d)' + (h * t) W_p' + t (W_t - W_d)' + b,
        # the same function of the same parameters. Its h term depends on the song alone, so it is
        # computed once per song of the table and looked up: one product per entry is left of four.
        first = self.attention[0]
        w_h, w_t, w_d, w_p = first.weight.split(t.shape[1], dim=1)
        per_song = self.items.weight @ (w_h + w_d).T  # (n_items + 1, hidden)
        z = per_song[songs] + (h * t[b]) @ w_p.T + (t @ (w_t - w_d).T + first.bias)[b]  # (n, hidden)
        weight = self.attention[1:](z)  # (n, 1)
        interest = torch.zeros_like(t).index_add(0, b, weight * h)  # (B, D): sum_i weight_i * h_i per row
        return self.head(torch.cat([interest, t, interest * t], dim=-1)).squeeze(-1)


@one_thread()
def train_din(item_emb, train, test, epochs=2, batch_size=256, lr=1e-3, seed=0, freeze_items=False):
    """Fit DIN on `train` examples (build_din_examples), return (AUC on `test`, test scores).

    The item table starts from L2-normalized item_emb rows, so music embeddings and
    the random baseline enter at the same scale whatever model produced them.
    """
    g = torch.Generator().manual_seed(seed)
    with _SEEDED_INIT:
        torch.manual_seed(seed)
        model = DIN(F.normalize(_as_float_tensor(item_emb), dim=1), freeze_items=freeze_items)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train["label"]), generator=g).split(batch_size):
            logit = model(train["target"][idx], train["history"][idx])
            loss = F.binary_cross_entropy_with_logits(logit, train["label"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(test["target"][i], test["history"][i])
                            for i in torch.arange(len(test["label"])).split(4096)])
    return auc(scores.numpy(), test["label"].numpy()), scores


def run_ranking(item_emb, impressions, task="ctr", train_days=range(1, 8), test_day=8, behaviour="clicked",
                max_len=50, seeds=(0,), **train_kw):
    """DIN AUC on test_day after training on train_days. impressions: dict of parallel arrays
    user_id, row, day, clicked, favoured. -> {"auc": (mean, std), "n_train", "n_test", "positive_rate"}."""
    ex = build_din_examples(impressions["user_id"], impressions["row"], impressions["day"], impressions["clicked"],
                            impressions["favoured"], task=task, behaviour=behaviour, max_len=max_len)
    is_train = torch.isin(ex["day"], torch.as_tensor(list(train_days)))
    is_test = ex["day"] == test_day
    train = {k: v[is_train] for k, v in ex.items()}
    test = {k: v[is_test] for k, v in ex.items()}
    if len(train["label"]) == 0 or len(test["label"]) == 0:
        raise ValueError(f"ranking {task}: {len(train['label'])} training impressions on days {list(train_days)}, "
                         f"{len(test['label'])} test impressions on day {test_day}; both must be non-empty")
    aucs = [train_din(item_emb, train, test, seed=s, **train_kw)[0] for s in seeds]
    return {"auc": mean_std(aucs), "n_train": len(train["label"]), "n_test": len(test["label"]),
            "positive_rate": float(test["label"].mean()), "per_seed_auc": aucs}


# -----------------------------------------------------------------------------
# Figure 2 (HTCL): cosine similarity of anchor-positive (favoured) and
# anchor-negative (recommended, not favoured) pairs. A representation that
# models user preference shifts the positive histogram to the right.


def pair_cosines(emb, anchors, songs):
    """emb (N, D); anchors, songs: (P,) rows -> (P,) cosine of each pair."""
    e = F.normalize(_as_float_tensor(emb), dim=1)
    a, s = torch.as_tensor(anchors, dtype=torch.long), torch.as_tensor(songs, dtype=torch.long)
    return (e[a] * e[s]).sum(1).numpy()


def separation(pos, neg):
    """mean(pos) - mean(neg) and the AUC of cosine as a pos-vs-neg score."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    return {"mean_gap": float(pos.mean() - neg.mean()),
            "auc": auc(np.r_[pos, neg], np.r_[np.ones(len(pos)), np.zeros(len(neg))]),
            "n_pos": len(pos), "n_neg": len(neg)}


def plot_histograms(cosines, path, bins=50):
    """cosines: {model name: (pos, neg)} -> PNG at `path`, one panel per model, the two histograms overlaid."""
    try:
        from matplotlib.figure import Figure  # no pyplot: files only, no display, no global figure state
    except ImportError:
        raise SystemExit("distance: the Figure 2 PNG needs matplotlib (pip install matplotlib); "
                         "the numbers above do not") from None
    fig = Figure(figsize=(4.2 * len(cosines), 3.2))
    axes = fig.subplots(1, len(cosines), squeeze=False)
    edges = np.linspace(-1, 1, bins + 1)
    for ax, (name, (pos, neg)) in zip(axes[0], cosines.items()):
        ax.hist(neg, bins=edges, density=True, alpha=0.55, color="tab:gray", label=f"negative (n={len(neg)})")
        ax.hist(pos, bins=edges, density=True, alpha=0.55, color="tab:red", label=f"positive (n={len(pos)})")
        ax.set_title(name)
        ax.set_xlabel("cosine similarity to anchor")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


# -----------------------------------------------------------------------------
# CrossMuSim retrieval protocol.
#   M2M: each song queries the others by cosine; songs with the same tag are
#        positives; mAP@100, one tag column at a time (coarse: genre, fine: sub-genre).
#   T2M: each tag value, as text, queries the songs through the text tower;
#        R@1, R@5 and mAP@10.
#   NOTE(paper): with many relevant songs per tag, R@K is read as "at least one
#        relevant song in the top K" (hit rate), the only reading under which R@1 is informative.
#   Same-artist leakage: share of queries whose top 100 holds a song by the
#        query's artist, and how many such songs on average.
#   Leakage control (--exclude-same COLUMN, e.g. artist_id): songs that share the
#        query's value of COLUMN are neither positives nor candidates, so a model
#        cannot score by recognising the artist (or the work a clip comes from).
# A tag is one string per song per column; "" means untagged: never a query, never a positive.
# An exclusion value "" groups nothing.


def group_codes(values):
    """Column values -> int codes, -1 for "" (no group)."""
    values = np.asarray(values, dtype=object)
    codes = np.unique(values, return_inverse=True)[1].astype(np.int64)
    return np.where(values == "", -1, codes)


@torch.no_grad()
def music_to_music_map(emb, tags, k=100, batch_size=1024, exclude_same=None):
    """mAP@k of query-by-example: (N, D), N tags -> (mAP, number of queries).
    exclude_same: N values (e.g. artists); songs sharing the query's value are left out."""
    tags = np.asarray(tags, dtype=object)
    codes = np.unique(tags, return_inverse=True)[1]
    tagged = tags != ""
    counts = np.bincount(codes[tagged], minlength=codes.max() + 1 if len(codes) else 0)
    n_relevant = counts[codes] - 1  # songs sharing the query's tag, itself excluded
    groups = None
    if exclude_same is not None:
        g = group_codes(exclude_same)
        # songs of the query's own group with its tag (itself included) are not positives
        pair = codes * (g.max() + 2) + (g + 1)
        same = np.bincount(pair[tagged & (g >= 0)], minlength=pair.max() + 1)[pair]
        n_relevant = np.where(g >= 0, counts[codes] - same, n_relevant)
    queries = np.flatnonzero(tagged & (n_relevant > 0))
    if len(queries) == 0:
        return float("nan"), 0
    if exclude_same is not None:
        groups = (g[queries], g)
    e = _as_float_tensor(emb)
    scores, idx = cosine_topk(e[queries], e, k, exclude=queries, batch_size=batch_size, groups=groups)
    relevant = (codes[idx.numpy()] == codes[queries][:, None]) & np.isfinite(scores.numpy())
    return map_at_k(relevant, n_relevant[queries], k), len(queries)


def text_to_music(query_emb, query_tags, song_emb, song_tags, ks=(1, 5), map_k=10):
    """Tag-text queries (Q, D) against songs (N, D); relevant = songs carrying the query's tag.

    -> {"R@1": .., "R@5": .., "mAP@10": .., "queries": Q'} over queries with >= 1 relevant song.
    """
    song_tags = np.asarray(song_tags, dtype=object)
    query_tags = np.asarray(query_tags, dtype=object)
    n_relevant = np.array([(song_tags == t).sum() for t in query_tags])
    keep = n_relevant > 0
    if not keep.any():
        return {**{f"R@{k}": float("nan") for k in ks}, f"mAP@{map_k}": float("nan"), "queries": 0}
    _, idx = cosine_topk(_as_float_tensor(query_emb)[torch.as_tensor(np.flatnonzero(keep))], song_emb,
                         max(max(ks), map_k))
    relevant = song_tags[idx.numpy()] == query_tags[keep][:, None]
    out = {f"R@{k}": float(relevant[:, :k].any(1).mean()) for k in ks}
    out[f"mAP@{map_k}"] = map_at_k(relevant, n_relevant[keep], map_k)
    out["queries"] = int(keep.sum())
    return out


def same_artist_stats(emb, artists, k=100, batch_size=1024, exclude_same=None):
    """Share of songs whose top-k neighbours hold >= 1 song by the same artist, and the mean count
    (over all queries and over the queries with >= 1). Songs with artist "" are skipped as queries.
    exclude_same: as in music_to_music_map, the candidates of the leakage control."""
    artists = np.asarray(artists, dtype=object)
    queries = np.flatnonzero(artists != "")
    groups = None if exclude_same is None else (group_codes(exclude_same)[queries], group_codes(exclude_same))
    e = _as_float_tensor(emb)
    scores, idx = cosine_topk(e[queries], e, k, exclude=queries, batch_size=batch_size, groups=groups)
    same = ((artists[idx.numpy()] == artists[queries][:, None]) & np.isfinite(scores.numpy())).sum(1)
    return {"share_with_same_artist": float((same > 0).mean()), "mean_same_artist": float(same.mean()),
            "mean_same_artist_given_any": float(same[same > 0].mean()) if (same > 0).any() else 0.0,
            "queries": len(queries)}


# -----------------------------------------------------------------------------
# Artist similarity with GraphSAGE (Grotschla et al., RecSys MuRS 2024, after
# Korzeniowski et al. 2021): node features = an artist's song embeddings
# (mean), random, or any given matrix. The paper gives little of the protocol;
# the authors' released code (lucastr98/gnn, graphgps/) decides, as
# ../shared/paper-notes.md section 3 lists it:
#   graphs   train: train-train edges over the train artists; val: + train-val
#            edges (train + val artists); test: every edge but test-test. An
#            edge passes messages first column -> second, as stored.
#   model    Linear(d, 256) + BatchNorm1d; L x [SAGEConv(project, mean) -> L2
#            -> ELU]; head 256-256-100; L2.
#   training 16 full-graph steps per epoch x 200 epochs, each step on every
#            directed train edge (both endpoints as anchors) with a fresh
#            negative per anchor; triplet loss, Euclidean, margin 0.2; AdamW;
#            ReduceLROnPlateau on the validation triplet loss.
#   score    test artists rank the other test artists by Euclidean distance;
#            NDCG@200 against the hidden test-test edges, after the last epoch.
# NOTE(paper): the released code's NDCG counts one ideal item too many; both
# that value ("_released_formula", what the paper reports) and standard NDCG are
# always reported.


@dataclasses.dataclass
class ArtistGraphConfig:
    hidden: int = 256            # encoder / layer width (paper; released dim_inner 256)
    out_dim: int = 100           # head output: 256-256-100 (released head)
    margin: float = 0.2          # triplet margin, Euclidean distance (paper)
    lr: float = 1e-3             # AdamW (paper)
    weight_decay: float = 0.05   # AdamW (paper)
    steps_per_epoch: int = 16    # released "batch_size 16" = 16 full-graph, all-triplet steps per epoch
    epochs: int = 200            # released max_epoch; the logged number is the last epoch's
    plateau_factor: float = 0.5  # ReduceLROnPlateau on the validation triplet loss (released)
    plateau_patience: int = 20   # (released)
    min_lr: float = 1e-5         # (released)
    early_stop: int = 0          # ours: stop after this many epochs without a better val loss; 0 = off (released)
    undirected: bool = False     # ours: symmetrise the edges; released: first column -> second only


def message_passing_graphs(edges, split, undirected=False):
    """edges: (E, 2) node indices, first column -> second; split: (N,) "train" / "val" / "test".

    -> {"train", "val", "test": (2, *) message-passing edges (src, dst) of each split's graph,
        "pairs": (2, *) train-train edges both ways (the training triplets' anchor, positive),
        "truth_val", "truth_test": (2, *) val-val / test-test edges both ways (hidden; the ground truth)}.
    Direction is kept as stored unless `undirected`; repeats and self-loops are dropped.
    """
    e = torch.as_tensor(np.asarray(edges), dtype=torch.long).reshape(-1, 2)
    e = e[e[:, 0] != e[:, 1]]
    if undirected:
        e = torch.cat([e, e.flip(1)])
    e = torch.unique(e, dim=0)
    split = np.asarray(split, dtype=object)
    kind = {s: torch.as_tensor(split == s) for s in ("train", "val", "test")}
    a = {s: m[e[:, 0]] for s, m in kind.items()}
    b = {s: m[e[:, 1]] for s, m in kind.items()}
    within = {s: a[s] & b[s] for s in kind}
    between = lambda s, t: (a[s] & b[t]) | (a[t] & b[s])  # noqa: E731
    train_val = within["train"] | between("train", "val")
    test = ~within["test"] & (a["train"] | a["val"] | a["test"]) & (b["train"] | b["val"] | b["test"])
    both = lambda m: torch.unique(torch.cat([e[m], e[m].flip(1)]), dim=0).T.contiguous()  # noqa: E731
    return {"train": e[within["train"]].T.contiguous(), "val": e[train_val].T.contiguous(),
            "test": e[test].T.contiguous(), "pairs": both(within["train"]),
            "truth_val": both(within["val"]), "truth_test": both(within["test"])}


def receptive_nodes(edge_index, targets, n_layers, n_nodes):
    """Sorted nodes whose features reach `targets` through <= n_layers message-passing hops."""
    keep = torch.zeros(n_nodes, dtype=torch.bool)
    keep[torch.as_tensor(targets, dtype=torch.long)] = True
    for _ in range(n_layers):
        keep[edge_index[0, keep[edge_index[1]]]] = True
    return torch.nonzero(keep).squeeze(1)


def local_graph(edge_index, nodes, n_nodes):
    """The subgraph on `nodes` -> (mean-aggregation CSR matrix (n, n), global -> local index).

    Row v holds 1 / in-degree(v) at each source u of an edge u -> v: A @ h is the mean over
    v's in-neighbours (zero for a node with none). Every edge between two kept nodes is kept,
    so with `nodes` from receptive_nodes the targets' outputs are exact."""
    local = torch.full((n_nodes,), -1, dtype=torch.long)
    local[nodes] = torch.arange(len(nodes))
    src, dst = local[edge_index[0]], local[edge_index[1]]
    ok = (src >= 0) & (dst >= 0)
    src, dst, n = src[ok], dst[ok], len(nodes)
    in_degree = torch.zeros(n).index_add_(0, dst, torch.ones(len(dst)))
    adj = torch.sparse_coo_tensor(torch.stack([dst, src]), 1.0 / in_degree[dst], (n, n),
                                  check_invariants=True).coalesce()
    # CSR sparse @ dense was 1.4-1.6x faster than index_add_ over the edge list (issue 13)
    with warnings.catch_warnings():  # torch's one-time "CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        return adj.to_sparse_csr(), local


class SAGEConv(nn.Module):
    """PyG's SAGEConv(project=True, normalize=True), mean aggregation, as the released layer builds it:
    h_v' = L2(lin_l(mean_{u -> v} relu(W_p h_u + b_p)) + lin_r(h_v)); the caller then applies ELU."""

    def __init__(self, d):
        super().__init__()
        self.project = nn.Linear(d, d)
        self.lin_l = nn.Linear(d, d)
        self.lin_r = nn.Linear(d, d, bias=False)

    def forward(self, h, adj):
        # NOTE(paper): L2 here, before the ELU, as PyG's normalize=True in the released layer does
        mean = torch.sparse.mm(adj, F.relu(self.project(h)))  # (n, d): mean over in-neighbours
        return F.normalize(self.lin_l(mean) + self.lin_r(h), dim=1)


class ArtistGNN(nn.Module):
    """features -> Linear(d, 256) + BatchNorm1d -> n_layers x (SAGEConv, ELU) -> head 256-256-100 -> L2.

    n_layers = 0 is the paper's "no graph" model: encoder + head, the graph is never read."""

    def __init__(self, d_in, n_layers, hidden=256, out_dim=100):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden))
        self.layers = nn.ModuleList(SAGEConv(hidden) for _ in range(n_layers))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                  nn.Linear(hidden, out_dim))

    def forward(self, x, adj=None):
        h = self.encoder(x)
        for layer in self.layers:
            h = F.elu(layer(h, adj))
        return F.normalize(self.head(h), dim=1)


def sample_negatives(anchors, pairs, candidates, n_nodes, generator):
    """One negative per anchor, uniform among `candidates` that are neither the anchor nor one of its
    neighbours in `pairs` (2, *) (as PyG's structured_negative_sampling, which the released code uses):
    draw, then redraw the rejected ones until none is left."""
    forbidden = pairs[0] * n_nodes + pairs[1]
    forbidden = torch.unique(torch.cat([forbidden, candidates * n_nodes + candidates]))
    neg = torch.empty_like(anchors)
    todo = torch.arange(len(anchors))
    for _ in range(1000):  # each round keeps a draw with probability >= 1 / len(candidates)
        if not len(todo):
            return neg
        neg[todo] = candidates[torch.randint(len(candidates), (len(todo),), generator=generator)]
        todo = todo[torch.isin(anchors[todo] * n_nodes + neg[todo], forbidden)]
    raise ValueError(f"artist graph: node {int(anchors[todo[0]])} is linked to every candidate negative")


def _split_view(graph, targets, n_layers, n_nodes):
    """The part of `graph` the targets' outputs need -> (nodes, adjacency, global -> local)."""
    nodes = receptive_nodes(graph, targets, n_layers, n_nodes)
    adj, local = local_graph(graph, nodes, n_nodes)
    return nodes, adj, local


@one_thread()
def train_artist_gnn(features, graphs, split, n_layers, cfg=None, seed=0, log=None, on_epoch=None):
    """Train on the train graph with the released protocol -> (model in eval mode, history).

    history: {"val_loss": [...], "lr": [...], "epochs": epochs run}. The validation triplets are
    drawn once (val-val edges both ways, negatives among the val artists), as the released data
    file stores them; without val-val edges the plateau schedule and early stopping are off.
    on_epoch(epoch, model), if given, runs after each epoch (bench.py scores the test set with it)."""
    cfg = cfg or ArtistGraphConfig()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = _as_float_tensor(features)
    n = x.shape[0]
    split = np.asarray(split, dtype=object)
    train_nodes = torch.as_tensor(np.flatnonzero(split == "train"))
    val_nodes = torch.as_tensor(np.flatnonzero(split == "val"))
    adj_train, local_train = local_graph(graphs["train"], train_nodes, n)
    x_train = x[train_nodes]
    anchors, positives = local_train[graphs["pairs"][0]], local_train[graphs["pairs"][1]]
    local_pairs = torch.stack([anchors, positives])
    candidates = torch.arange(len(train_nodes))
    val = None
    if graphs["truth_val"].shape[1]:
        va, vp = graphs["truth_val"]
        vn = sample_negatives(va, graphs["truth_val"], val_nodes, n, g)
        nodes, adj_val, local_val = _split_view(graphs["val"], val_nodes, n_layers, n)
        val = (x[nodes], adj_val, local_val[va], local_val[vp], local_val[vn])
    model = ArtistGNN(x.shape[1], n_layers, cfg.hidden, cfg.out_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.plateau_factor,
                                                         patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    history = {"val_loss": [], "lr": [], "epochs": 0}
    best, since_best = float("inf"), 0
    for epoch in range(cfg.epochs):
        model.train()
        for _ in range(cfg.steps_per_epoch):
            z = model(x_train, adj_train)  # (n_train, out_dim): every train artist, every step
            negatives = sample_negatives(anchors, local_pairs, candidates, len(train_nodes), g)
            loss = F.triplet_margin_loss(z[anchors], z[positives], z[negatives], margin=cfg.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history["epochs"] = epoch + 1
        history["lr"].append(opt.param_groups[0]["lr"])
        if on_epoch:
            on_epoch(epoch + 1, model)
        if val is None:
            continue
        model.eval()
        with torch.no_grad():
            zv = model(val[0], val[1])
            val_loss = float(F.triplet_margin_loss(zv[val[2]], zv[val[3]], zv[val[4]], margin=cfg.margin))
        history["val_loss"].append(val_loss)
        plateau.step(val_loss)
        if log:
            log(f"layers {n_layers} epoch {epoch + 1}: train loss {float(loss):.4f}, val loss {val_loss:.4f}, "
                f"lr {history['lr'][-1]:.1e}")
        # NOTE(paper): early stopping is ours and off by default (the released code runs all epochs)
        since_best = 0 if val_loss < best else since_best + 1
        best = min(best, val_loss)
        if cfg.early_stop and since_best >= cfg.early_stop:
            break
    return model.eval(), history


@torch.no_grad()
def embed_artists(model, features, graph, targets, n_layers):
    """Embeddings of `targets` (global ids) through `graph`, computed over their receptive field only."""
    x = _as_float_tensor(features)
    nodes, adj, local = _split_view(graph, targets, n_layers, x.shape[0])
    return model.eval()(x[nodes], adj)[local[torch.as_tensor(targets, dtype=torch.long)]]


def released_ndcg_at_k(relevant, n_relevant, k):
    """NDCG@k as the released code computes it (calculate_ndcg_at_k): the DCG as ndcg_at_k, but the
    ideal DCG indexes cumsum(discounts) 0-based at min(n, k), i.e. sums min(n, k) + 1 ideal items.
    -> (Q,), NaN where n_relevant = 0."""
    rel = np.asarray(relevant, dtype=np.float64)[:, :k]
    discount = 1.0 / np.log2(np.arange(2, k + 3))  # ranks 1..k+1: the ideal list's extra item
    dcg = (rel * discount[:rel.shape[1]]).sum(1)
    n_relevant = np.asarray(n_relevant)
    ideal = np.cumsum(discount)[np.minimum(n_relevant, k)]
    return np.where(n_relevant > 0, dcg / ideal, np.nan)


@torch.no_grad()
def artist_ndcg(z, truth, k=200):
    """z: (n, D) embeddings of the eval artists; truth: (2, *) hidden edges in local indices 0..n-1,
    both ways. Each artist ranks the others by Euclidean distance; mean over the artists with >= 1
    hidden edge -> {"ndcg": standard NDCG@k, "ndcg_released": released formula, "queries": count}.
    NOTE(paper): that mean (paper-notes section 3), not the mean over non-zero NDCGs that the newest
    released custom_train.py logs: only the former puts the paper's 0-layer .017 at chance level."""
    n = z.shape[0]
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    adjacency[truth[0], truth[1]] = True
    n_relevant = adjacency.sum(1)
    queries = torch.nonzero(n_relevant > 0).squeeze(1)
    if len(queries) == 0:
        return {"ndcg": float("nan"), "ndcg_released": float("nan"), "queries": 0}
    dist = torch.cdist(z[queries], z)  # (Q, n)
    dist[torch.arange(len(queries)), queries] = float("inf")  # never retrieve yourself
    idx = dist.topk(min(k, n - 1), dim=1, largest=False).indices
    relevant = adjacency[queries[:, None], idx].numpy()
    n_rel = n_relevant[queries].numpy()
    return {"ndcg": float(np.mean(ndcg_at_k(relevant, n_rel, k))),
            "ndcg_released": float(np.mean(released_ndcg_at_k(relevant, n_rel, k))), "queries": len(queries)}


def artist_graph_ndcg(features, edges, split, eval_split="test", layers=(0, 1, 2, 3, 4), k=200, seeds=(0,),
                      cfg=None, log=None):
    """The sweep over the number of GraphSAGE layers -> {n_layers: {"ndcg@k": (mean, std over seeds),
    "ndcg@k_released_formula": (mean, std), "epochs": [epochs run per seed], "queries": count}}."""
    cfg = cfg or ArtistGraphConfig()
    split = np.asarray(split, dtype=object)
    graphs = message_passing_graphs(edges, split, cfg.undirected)
    if graphs["pairs"].shape[1] == 0 or graphs[f"truth_{eval_split}"].shape[1] == 0:
        raise ValueError(f"artist graph: {graphs['pairs'].shape[1] // 2} train-train edges and "
                         f"{graphs[f'truth_{eval_split}'].shape[1] // 2} {eval_split}-{eval_split} edges; "
                         f"both must be non-empty")
    eval_nodes = torch.as_tensor(np.flatnonzero(split == eval_split))
    local = torch.full((len(split),), -1, dtype=torch.long)
    local[eval_nodes] = torch.arange(len(eval_nodes))
    truth = local[graphs[f"truth_{eval_split}"]]
    table = {}
    for n_layers in layers:
        runs = []
        for seed in seeds:
            model, history = train_artist_gnn(features, graphs, split, n_layers, cfg, seed, log)
            z = embed_artists(model, features, graphs[eval_split], eval_nodes, n_layers)
            runs.append({**artist_ndcg(z, truth, k), "epochs": history["epochs"]})
        table[n_layers] = {f"ndcg@{k}": mean_std([r["ndcg"] for r in runs]),
                           f"ndcg@{k}_released_formula": mean_std([r["ndcg_released"] for r in runs]),
                           "epochs": [r["epochs"] for r in runs], "queries": runs[0]["queries"]}
    return table


# -----------------------------------------------------------------------------
# Where song embeddings come from: a trained artifact (embedded here), a saved
# embeddings file (any model's), or random vectors (the chance baseline).

KINDS = ("audio", "text", "fused")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # for the encoders; the small evaluation models stay on CPU
CHUNK_FRAMES = 10 * SAMPLE_RATE // HOP_LENGTH  # CrossMuSim's 10 s windows: 104 frames at 16 kHz, 96 ms hop


@torch.no_grad()
def embed_catalog(model, tokenizer, catalog, rows=None, mode=None, kinds=("audio",), cache=None, batch_size=16,
                  chunk_frames=None):
    """Embeddings of catalog songs -> {kind: (len(rows), D) float32 numpy}, rows in the order given.

    mode "full":    the whole decoded song (first 120 s) in one pass: HTCL's setting.
    mode "chunked": non-overlapping windows of chunk_frames (10 s), each encoded on its own,
                    then mean-pooled: CrossMuSim's inference. A trailing window shorter than
                    MIN_FRAMES is dropped, unless it is the song's only one.
    mode None:      the mode the model was trained for (model.cfg.embed_mode); chunk_frames None:
                    model.cfg.chunk_seconds (10 s unless the artifact says otherwise).
    NOTE(paper): CrossMuSim chunks the whole track; here the chunks cover the first
    120 s that data.py decodes and caches. Chunk projections are averaged before
    L2 normalization, so the fusion MLP receives the same kind of input as in training.
    """
    rows = list(range(len(catalog))) if rows is None else list(rows)
    mode = mode or model.cfg.embed_mode
    chunk_frames = chunk_frames or seconds_to_frames(model.cfg.chunk_seconds)
    dataset = SongDataset(catalog, rows, cache)
    if len(dataset) != len(rows):  # songs whose audio failed in prepare: no embedding, so say which
        lost = sorted(set(rows) - set(dataset.rows))
        raise ValueError(f"{catalog.path}: {len(lost)} songs have no log-mel in the cache (failed to decode), "
                         f"e.g. {[catalog[r].song_id for r in lost[:5]]}; fix or remove them from the catalog")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=Collator(tokenizer))
    model.eval()
    device = next(model.parameters()).device
    want_text = "text" in kinds or "fused" in kinds
    out = {k: [] for k in kinds}
    bar = _progress(len(rows), f"embed ({mode})")
    for batch in loader:
        mel, mask = batch["mel"].to(device), batch["padding_mask"].to(device)
        audio = _encode_audio(model, mel, mask, mode, batch_size, chunk_frames)  # (B, D)
        text = model.encode_text({k: v.to(device) for k, v in batch["tokens"].items()}, normalize=False) \
            if want_text else None
        if "audio" in kinds:
            out["audio"].append(F.normalize(audio, dim=-1))
        if "text" in kinds:
            out["text"].append(F.normalize(text, dim=-1))
        if "fused" in kinds:
            out["fused"].append(model.fuse(audio, text))  # fuse takes the un-normalized projections
        bar.update(len(mel))
    bar.close()
    return {k: torch.cat(v).float().cpu().numpy() for k, v in out.items()}


def _encode_audio(model, mel, mask, mode, batch_size, chunk_frames=CHUNK_FRAMES):
    """(B, T, M) padded log-mels -> (B, D) un-normalized audio projections, whole song or 10 s windows."""
    if mode == "full":
        return model.encode_audio(mel, mask, normalize=False)  # (B, D)
    if mode == "chunked":
        return _encode_chunked(model, mel, mask, chunk_frames, MIN_FRAMES, batch_size)
    raise ValueError(f"unknown embed mode {mode!r} (full, chunked)")


def _encode_chunked(model, mel, mask, chunk_frames, min_frames, batch_size):
    """(B, T, M) padded songs -> (B, D): mean of the un-normalized projections of their 10 s windows."""
    chunks, owner = [], []
    for b, length in enumerate((~mask).sum(1).tolist()):
        starts = list(range(0, length, chunk_frames))
        for s in starts:
            n = min(chunk_frames, length - s)
            if n >= min_frames or s == 0:
                chunks.append(mel[b, s:s + n])
                owner.append(b)
    owner = torch.tensor(owner, device=mel.device)
    embs = []
    for i in range(0, len(chunks), batch_size * 4):
        part = chunks[i:i + batch_size * 4]
        T = max(min_frames, max(len(c) for c in part))
        x = mel.new_zeros(len(part), T, mel.shape[2])
        pad = torch.ones(len(part), T, dtype=torch.bool, device=mel.device)
        for j, c in enumerate(part):
            x[j, :len(c)] = c
            pad[j, :len(c)] = False
        embs.append(model.encode_audio(x, pad, normalize=False))
    embs = torch.cat(embs)  # (n_chunks, D)
    total = embs.new_zeros(mel.shape[0], embs.shape[1]).index_add_(0, owner, embs)
    return total / torch.bincount(owner, minlength=mel.shape[0]).clamp(min=1)[:, None].to(embs.dtype)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, batch_size=64):
    """Free texts (e.g. tag names for T2M) through the text tower -> (len(texts), D) normalized numpy."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size]), padding="longest", truncation=True, max_length=512,
                           return_tensors="pt")
        out.append(model.encode_text({k: v.to(device) for k, v in tokens.items()}))
    return torch.cat(out).float().cpu().numpy()


def save_embeddings(folder, ids, embeddings, meta=None):
    """folder/ids.txt + folder/{kind}.npy (float32) for each kind; meta -> folder/meta.json."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ids.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in ids))
    for kind, x in embeddings.items():
        np.save(os.path.join(folder, f"{kind}.npy"), np.asarray(x, dtype=np.float32))
    if meta is not None:
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)


def read_ids(path):
    """One id per line -> list; empty lines inside, or duplicates, are errors naming the line.
    Read as catalogs are read (data.load_catalog): a UTF-8 BOM is skipped, each id is stripped."""
    with open(path, encoding="utf-8-sig") as f:
        ids = [i.strip() for i in f.read().splitlines()]
    while ids and ids[-1] == "":
        ids.pop()
    seen = {}
    for line, i in enumerate(ids, start=1):
        if i == "":
            raise ValueError(f"{path}: line {line} is empty; expected one id per line")
        if i in seen:
            raise ValueError(f"{path}: id '{i}' on line {seen[i]} and again on line {line}")
        seen[i] = line
    return ids


def load_embeddings(spec, kind="audio"):
    """An embeddings file or `embed` folder -> (ids, (N, D) float32). See the module docstring."""
    if os.path.isdir(spec):
        ids_path, npy_path = os.path.join(spec, "ids.txt"), os.path.join(spec, f"{kind}.npy")
        if not os.path.exists(ids_path):
            raise FileNotFoundError(f"{spec}: neither an embeddings folder from `embed` (no ids.txt) nor an "
                                    f"artifact (no config.json)")
        if not os.path.exists(npy_path):
            have = [k for k in KINDS if os.path.exists(os.path.join(spec, f"{k}.npy"))]
            raise FileNotFoundError(f"{spec}: no {kind}.npy (has: {', '.join(have) or 'none'}); "
                                    f"re-run embed with --text/--fused, or pick --kind")
    elif spec.endswith(".npy"):
        npy_path, ids_path = spec, spec[:-len(".npy")] + ".ids.txt"
    else:
        raise ValueError(f"{spec}: not an embeddings folder (ids.txt + audio.npy), a NAME.npy file, "
                         f"an artifact folder (config.json) or random[:D]")
    if not os.path.exists(npy_path):
        raise FileNotFoundError(f"{npy_path}: no such file")
    if not os.path.exists(ids_path):
        raise FileNotFoundError(f"{npy_path}: no ids file {ids_path} (one song_id a line, in row order)")
    try:
        x = np.load(npy_path, allow_pickle=False)  # never unpickle: a .npy can carry code
    except ValueError as e:  # an object (pickled) array, or not a .npy at all
        raise ValueError(f"{npy_path}: not a plain numeric .npy ({e}); save it with "
                         f"np.save(path, array.astype(np.float32))") from None
    ids = read_ids(ids_path)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise ValueError(f"{npy_path}: shape {x.shape}, expected ({len(ids)}, D) to match the {len(ids)} ids "
                         f"of {ids_path}")
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise ValueError(f"{npy_path}: {int(bad.sum())} rows hold NaN/inf, e.g. row {int(np.argmax(bad))} "
                         f"(id '{ids[int(np.argmax(bad))]}')")
    return ids, x.astype(np.float32)


def align(ids, x, wanted, source, what="song"):
    """Rows of x reordered to `wanted` ids -> (len(wanted), D). A wanted id without a row is an error."""
    index = {i: r for r, i in enumerate(ids)}
    missing = [w for w in wanted if w not in index]
    if missing:
        raise ValueError(f"{source}: no embedding for {len(missing)} of {len(wanted)} {what}s, "
                         f"e.g. {', '.join(missing[:5])}")
    extra = len(ids) - len(wanted)
    if extra > 0:
        print(f"{source}: {extra} embedded {what}s are not in the evaluated set and are ignored")
    return x[[index[w] for w in wanted]]


def random_embeddings(n, dim=100, seed=0):
    """The chance baseline: seeded Gaussian vectors (unit-normalized by every cosine and by DIN)."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def is_artifact(spec):
    return os.path.isdir(spec) and os.path.exists(os.path.join(spec, "config.json")) \
        and not os.path.exists(os.path.join(spec, "ids.txt"))


def song_embeddings(spec, catalog, kind="audio", mode=None, cache=None, batch_size=16):
    """Any embedding source -> (len(catalog), D) float32, row r = catalog song r.
    mode (artifacts only): full | chunked | None = what the artifact was trained for."""
    if spec == "random" or spec.startswith("random:"):
        dim = spec.split(":", 1)[1] if ":" in spec else "100"
        if not dim.isdigit() or int(dim) < 1:
            raise ValueError(f"--emb {spec}: expected random or random:D with D a positive integer")
        return random_embeddings(len(catalog), int(dim))
    if is_artifact(spec):
        model, tokenizer = load_artifact(spec, DEVICE, text=kind != "audio")
        print(f"{spec}: embedding {len(catalog)} songs ({kind}, {mode or model.cfg.embed_mode}); "
              f"save them once with `embed` to skip this")
        return embed_catalog(model, tokenizer, catalog, mode=mode, kinds=(kind,), cache=cache,
                             batch_size=batch_size)[kind]
    ids, x = load_embeddings(spec, kind)
    return align(ids, x, [s.song_id for s in catalog.songs], spec)


# -----------------------------------------------------------------------------
# Readers of the evaluation logs. A malformed value is an error naming the file,
# line and column; a song missing from the catalog is dropped and counted
# aloud (as data.load_favourites does), never silently.


def _records(path, required):
    return _read_records(str(path), required)[1]


def _parse(path, line, column, value, kind):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{path}: line {line}, column '{column}': cannot read {value!r} as "
                         f"{getattr(kind, '__name__', kind)}") from None


def _flag(value):
    v = value.strip().lower()
    if v in ("1", "true", "yes", "y", "positive", "pos"):
        return True
    if v in ("0", "false", "no", "n", "negative", "neg", ""):
        return False
    raise ValueError(value)


def _drop_unknown(path, catalog, dropped, total):
    if dropped:
        first = "; ".join(f"line {line}: '{sid}'" for line, sid in dropped[:5])
        print(f"WARNING {path}: dropped {len(dropped)} of {total} rows naming a song not in {catalog.path}; "
              f"first: {first}", file=sys.stderr)


def read_impressions(path, catalog):
    """impressions CSV (user_id, song_id, day, clicked, favoured) -> dict of parallel numpy arrays."""
    records = _records(path, ("user_id", "song_id", "day", "clicked", "favoured"))
    out = {k: [] for k in ("user_id", "row", "day", "clicked", "favoured")}
    dropped = []
    for line, rec in records:
        sid = rec["song_id"].strip()
        day = _parse(path, line, "day", rec["day"].strip(), int)
        clicked = _parse(path, line, "clicked", rec["clicked"], _flag)
        favoured = _parse(path, line, "favoured", rec["favoured"], _flag)
        if sid not in catalog.index:
            dropped.append((line, sid))
            continue
        out["user_id"].append(rec["user_id"].strip())
        out["row"].append(catalog.index[sid])
        out["day"].append(day)
        out["clicked"].append(clicked)
        out["favoured"].append(favoured)
    _drop_unknown(path, catalog, dropped, len(records))
    out = {k: np.asarray(v, dtype=object if k == "user_id" else None) for k, v in out.items()}
    odd = int((out["favoured"] & ~out["clicked"]).sum()) if len(out["row"]) else 0
    if odd:
        print(f"WARNING {path}: {odd} impressions are favoured but not clicked; CVR only sees clicked ones",
              file=sys.stderr)
    return out


def read_labelled_pairs(path, catalog, seed=0):
    """Figure 2 pairs -> (anchors, songs, is_positive) catalog rows. Two formats:
      anchor,song,label                 label positive/negative (or 1/0), as in Figure 2
      trigger_song_id,rec_song_id       stage-2 pairs (data.py): every pair is a positive, and each
                                        gets one negative, a seeded random song of the catalog
    NOTE(paper): the paper's negatives are recommended songs the user did not favour; random
    songs are easier negatives, so prefer a labelled file or --impressions where there is one.
    """
    columns, records = _read_records(str(path), ())
    labelled = all(c in columns for c in ("anchor", "song", "label"))
    if not labelled and not all(c in columns for c in ("trigger_song_id", "rec_song_id")):
        raise ValueError(f"{path}: line 1 (header): expected columns anchor,song,label or "
                         f"trigger_song_id,rec_song_id; found: {', '.join(columns)}")
    a_col, s_col = ("anchor", "song") if labelled else ("trigger_song_id", "rec_song_id")
    anchors, songs, labels, dropped = [], [], [], []
    for line, rec in records:
        a, s = rec.get(a_col, "").strip(), rec.get(s_col, "").strip()
        label = _parse(path, line, "label", rec["label"], _flag) if labelled else True
        if a not in catalog.index or s not in catalog.index:
            dropped.append((line, a if a not in catalog.index else s))
            continue
        anchors.append(catalog.index[a])
        songs.append(catalog.index[s])
        labels.append(label)
    _drop_unknown(path, catalog, dropped, len(records))
    if not labelled:
        rng = np.random.default_rng(seed)
        negatives = rng.integers(0, len(catalog), len(anchors))
        while True:  # never the anchor or its positive
            clash = (negatives == np.array(anchors)) | (negatives == np.array(songs))
            if not clash.any():
                break
            negatives[clash] = (negatives[clash] + 1) % len(catalog)
        print(f"{path}: no label column, so its {len(anchors)} pairs are positives, each with one random "
              f"negative song (seed {seed})")
        anchors, songs = anchors + anchors, songs + negatives.tolist()
        labels = labels + [False] * len(negatives)
    return np.array(anchors, dtype=np.int64), np.array(songs, dtype=np.int64), np.array(labels, dtype=bool)


def pairs_from_impressions(imp):
    """Figure 2 pairs from an impressions log, our reading of "anchor songs with positive (favoured)
    and negative recommended songs": for each impression whose user favoured a song on an earlier
    day, anchor = that user's most recent such favourite; positive if this impression was favoured,
    negative if it was shown and not favoured. -> (anchors, songs, is_positive)."""
    anchors, songs, labels = [], [], []
    users = imp["user_id"].astype(str)
    for user in np.unique(users):
        mine = np.flatnonzero(users == user)
        mine = mine[np.argsort(imp["day"][mine], kind="stable")]
        last_fav, day_favs, day = None, None, None
        for i in mine:
            if imp["day"][i] != day:  # a new day: yesterday's favourites become eligible anchors
                last_fav = day_favs if day_favs is not None else last_fav
                day, day_favs = imp["day"][i], None
            if last_fav is not None and imp["row"][i] != last_fav:
                anchors.append(last_fav)
                songs.append(imp["row"][i])
                labels.append(bool(imp["favoured"][i]))
            if imp["favoured"][i]:
                day_favs = imp["row"][i]
    return np.array(anchors, dtype=np.int64), np.array(songs, dtype=np.int64), np.array(labels, dtype=bool)


def read_artist_graph(edges_path, split_path):
    """artist_split CSV (artist_id, split) + edge CSV (artist_a, artist_b)
    -> (artist ids, split per artist, (E, 2) int edges). An edge to an unknown artist is an error."""
    artists, split, index = [], [], {}
    for line, rec in _records(split_path, ("artist_id", "split")):
        aid = rec["artist_id"].strip()
        if not aid or aid in index:
            raise ValueError(f"{split_path}: line {line}, column 'artist_id': {'repeated' if aid else 'empty'} "
                             f"artist_id {aid!r}")
        index[aid] = len(artists)
        artists.append(aid)
        split.append(rec["split"].strip())
    edges = []
    for line, rec in _records(edges_path, ("artist_a", "artist_b")):
        a, b = rec["artist_a"].strip(), rec["artist_b"].strip()
        for v, col in ((a, "artist_a"), (b, "artist_b")):
            if v not in index:
                raise ValueError(f"{edges_path}: line {line}, column '{col}': artist '{v}' is not in {split_path}")
        edges.append((index[a], index[b]))
    return artists, np.array(split, dtype=object), np.array(edges, dtype=np.int64).reshape(-1, 2)


def artist_features(kind, artists, catalog=None, song_emb=None, artist_column="artist_id", dim=2613, seed=0):
    """Node features: "mean" of each artist's song embeddings, "random", or NAME.npy
    (with NAME.ids.txt holding artist ids). "random" is the released code's: uniform [0, 1),
    2613-d (its feature width), seed 0."""
    if kind == "random":
        return np.random.default_rng(seed).random((len(artists), dim), dtype=np.float32)
    if kind == "mean":
        if catalog is None or song_emb is None:
            raise ValueError("artist-graph --features mean needs --catalog and --emb")
        if artist_column not in catalog.columns:
            raise ValueError(f"{catalog.path}: no column '{artist_column}' to group songs by artist")
        index = {a: i for i, a in enumerate(artists)}
        total = np.zeros((len(artists), song_emb.shape[1]), dtype=np.float64)
        count = np.zeros(len(artists))
        for r in range(len(catalog)):
            i = index.get(catalog.label(r, artist_column))
            if i is not None:
                total[i] += song_emb[r]
                count[i] += 1
        if (count == 0).any():
            print(f"WARNING artist-graph: {int((count == 0).sum())} artists have no song in {catalog.path}; "
                  f"their mean feature is zero", file=sys.stderr)
        return (total / np.maximum(count, 1)[:, None]).astype(np.float32)
    ids, x = load_embeddings(kind)
    return align(ids, x, artists, kind, what="artist")


# -----------------------------------------------------------------------------
# Table 2 in one go: every evaluation that the given files allow.


def report(sources, catalog, favourites=None, impressions=None, pairs=None, out_dir="report", kind="audio",
           mode=None, cache=None, probe_seeds=(0, 1, 2, 3, 4), ranking_seeds=(0,), ranking_epochs=2,
           n_triggers=30, workers=None, reuse=True):
    """sources: {name: embedding spec}; favourites / impressions / pairs: paths or None.
    Writes out_dir/table2.md (ACC genre, ACC language, HR@100, CTR AUC, CVR AUC, as in HTCL
    Table 2; "-" where a protocol is skipped, with the reason as a footnote; no ranking with
    ranking_seeds=()) and out_dir/figure2.png (from pairs, else from impressions) with its cosines in
    out_dir/figure2.npz ({model}/pos, {model}/neg: for pooling runs, see table2_over_seeds) and
    out_dir/table2.json (the same numbers: {model: {acc_genre: [mean, std], hr@100: ..., ...}}).
    Prints a line per protocol and model, and each protocol's total time. The probes and DIN
    models train on `workers` threads (default: the available cores, at most 8). With reuse, a
    probe or DIN result already in out_dir/results.json for the same embedding matrix (byte for
    byte) and the same labels, split, impressions and settings is taken from there: adding a
    model to a report trains only its own jobs (demo.sh evaluates stage 1 while stage 2 trains).
    Returns the Markdown table with its footnotes."""
    os.makedirs(out_dir, exist_ok=True)
    split, split_note = probe_split(catalog)
    skipped = {}  # column -> why it shows "-"
    for column, title in (("genre", "ACC genre"), ("language", "ACC lang")):
        if column not in catalog.columns:
            skipped[title] = f"{catalog.path} has no '{column}' column"
    if split_note:
        print("report: " + split_note)
    favs = cases = imp = None
    if favourites:
        favs = load_favourites(favourites, catalog)
        cases = sample_matching_cases(favs, n_triggers)
        if not len(cases[1]):
            skipped["HR@100"] = f"no user of {favourites} has more than {n_triggers} favourites (--triggers)"
    else:
        skipped["HR@100"] = "no --favourites given"
    if impressions:
        imp = read_impressions(impressions, catalog)
    else:
        skipped["CTR AUC"] = skipped["CVR AUC"] = "no --impressions given"
    if impressions and not ranking_seeds:
        skipped["CTR AUC"] = skipped["CVR AUC"] = "DIN not run (--ranking-seeds 0)"
    if pairs:
        fig_pairs = read_labelled_pairs(pairs, catalog)
    elif imp is not None:
        fig_pairs = pairs_from_impressions(imp)
    else:
        fig_pairs = None
        skipped["Fig. 2 AUC"] = "neither --pairs nor --impressions given"
    header = ["Model", "ACC genre", "ACC lang", "HR@100", "CTR AUC", "CVR AUC", "Fig. 2 AUC"]
    times = []  # (protocol, seconds), appended from several threads (list.append is atomic)

    def timed_call(name, protocol, fn, *args, **kw):
        t0 = time.time()
        out = fn(*args, **kw)
        dt = time.time() - t0
        times.append((protocol, dt))
        print(f"report: {name}: {protocol} {dt:.1f} s", flush=True)
        return out

    results, cosines = {name: {} for name in sources}, {}
    label_columns = [c for c in ("genre", "language") if c in catalog.columns]
    labels = {c: [catalog.label(r, c) for r in range(len(catalog))] for c in label_columns}
    # The probes and DIN models are most of the time, and independent: they train side by side,
    # one job a thread (each on one intra-op thread; their kernels release the GIL), while this
    # thread embeds the next model. Sources that need no model (random, saved embeddings) go
    # first, so their jobs start while the artifacts load. Each job is seeded and draws no shared
    # random number outside _SEEDED_INIT, so the results do not depend on `workers` or timing.
    workers = workers or min(8, available_cores())
    order = sorted(sources, key=lambda name: is_artifact(sources[name]))  # stable: the given order otherwise
    # A job's result depends on nothing but its embedding matrix and these inputs (it is seeded):
    # their digest is its key in results.json.
    saved_path = os.path.join(out_dir, "results.json")
    saved = {}
    if reuse and os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)
    inputs = {}  # result key -> digest of what the job reads besides the embeddings
    if reuse:
        inputs = {f"acc_{c}": _digest(labels[c], split, list(probe_seeds), PROBE_LR, PROBE_MIN_STEPS)
                  for c in label_columns}
        if imp is not None and ranking_seeds:
            imp_digest = _digest(*(imp[k] for k in sorted(imp)))  # once: the log may be large
            inputs.update({f"{t}_auc": _digest(imp_digest, t, list(ranking_seeds), ranking_epochs)
                           for t in ("ctr", "cvr")})
    keys = {}  # (model, result key) -> digest
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        jobs = {}  # future -> (model, result key)
        try:
            for name in order:
                emb = timed_call(name, "embeddings", song_embeddings, sources[name], catalog, kind, mode, cache)
                todo = [(f"acc_{c}", f"probe {c}", run_probe, (emb, labels[c], split), dict(seeds=probe_seeds))
                        for c in label_columns]
                todo += [(f"{t}_auc", f"ranking {t}", run_ranking, (emb, imp, t),
                          dict(seeds=ranking_seeds, epochs=ranking_epochs))
                         for t in ("ctr", "cvr") if imp is not None and ranking_seeds]
                emb_digest = _digest(np.asarray(emb, dtype=np.float32)) if reuse else None
                for key, protocol, fn, args, kw in todo:
                    digest = keys[name, key] = _digest(emb_digest, inputs[key]) if reuse else None
                    if digest in saved:
                        results[name][key] = tuple(saved[digest])
                        print(f"report: {name}: {protocol} reused from {saved_path} (same embeddings and inputs)")
                    else:
                        jobs[pool.submit(timed_call, name, protocol, fn, *args, **kw)] = (name, key)
                if cases is not None and len(cases[1]):
                    hits = timed_call(name, "matching", matching_hits, emb, cases[0], cases[1], progress=False)
                    results[name]["hr@100"] = float(hits.float().mean())
                if fig_pairs is not None:
                    cos = pair_cosines(emb, fig_pairs[0], fig_pairs[1])
                    cosines[name] = (cos[fig_pairs[2]], cos[~fig_pairs[2]])
                    results[name]["fig2_auc"] = separation(*cosines[name])["auc"]
            if cosines:  # drawn while the last jobs train
                cosines = {name: cosines[name] for name in sources}
                plot_histograms(cosines, os.path.join(out_dir, "figure2.png"))
            if jobs:
                print(f"report: waiting for {sum(not j.done() for j in jobs)} of {len(jobs)} probe and DIN jobs "
                      f"({workers} threads)", flush=True)
            for job in as_completed(jobs):
                name, key = jobs[job]
                results[name][key] = job.result()["acc" if key.startswith("acc_") else "auc"]
        except BaseException:
            pool.shutdown(cancel_futures=True)  # an error or Ctrl-C: do not train the queued jobs
            raise
    if reuse:  # this run's probe and DIN results, added to those saved before
        saved.update({digest: results[name][key] for (name, key), digest in keys.items()})
        with open(saved_path + ".tmp", "w") as f:
            json.dump(saved, f, indent=0)
        os.replace(saved_path + ".tmp", saved_path)
    columns = ["acc_genre", "acc_language", "hr@100", "ctr_auc", "cvr_auc", "fig2_auc"]
    results = {name: {k: res[k] for k in columns if k in res} for name, res in results.items()}  # job order aside
    rows = []
    for name, res in results.items():
        row = [name]
        row += [_pm(res[f"acc_{c}"]) if f"acc_{c}" in res else "-" for c in ("genre", "language")]
        row.append(f"{100 * res['hr@100']:.2f}%" if "hr@100" in res else "-")
        row += [_pm(res[f"{t}_auc"]) if f"{t}_auc" in res else "-" for t in ("ctr", "cvr")]
        row.append(f"{res['fig2_auc']:.4f}" if "fig2_auc" in res else "-")
        rows.append(row)
    table = markdown_table(header, rows)
    if skipped:
        table += "\n\n" + "\n".join(f"- {column} \"-\": {why}" for column, why in skipped.items())
    with open(os.path.join(out_dir, "table2.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "table2.json"), "w") as f:  # the same numbers, for scripts
        json.dump(results, f, indent=1, default=float)
    if cosines:
        np.savez(os.path.join(out_dir, "figure2.npz"),
                 **{f"{name}/{side}": c for name, pair in cosines.items() for side, c in zip(("pos", "neg"), pair)})
    seconds = defaultdict(float)  # protocol -> total over models
    for protocol, dt in times:
        seconds[protocol] += dt
    print("report: time per protocol, summed over models (the probes and DIN run side by side): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return table


def _digest(*parts):
    """sha1 hex of numpy arrays (their bytes, dtype and shape), strings, numbers and lists of them."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, np.ndarray):
            part = part.astype(str) if part.dtype == object else part  # ids: fixed-width unicode, not pickles
            h.update(f"{part.dtype}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, default=str).encode())
        h.update(b"|")
    return h.hexdigest()


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pm(mean_std_pair, digits=4):
    m, s = mean_std_pair
    return f"{m:.{digits}f} ± {s:.{digits}f}"


# -----------------------------------------------------------------------------
# Similar-song search: "which songs of my catalog sound like this file?"
# A query is an audio file (embedded here: no catalog row, no text) or a song id of
# the catalog. Songs are compared by their audio embeddings, the only kind a bare
# file has. Exact cosine top-k in torch (cosine_topk) by default; for large catalogs
# a FAISS index (faiss-cpu, an optional extra imported only when asked for) that
# `embed --index faiss` saves beside the embeddings, and `matching` can use too.

# Below this many songs the index is exact (IndexFlatIP); from it on, approximate:
# IVF (inverted lists of k-means cells, sqrt(N) cells) scanning FAISS_NPROBE cells a
# query, with exact cosines for the songs scanned. Chosen by measuring (README
# Performance): of the candidates tried on 2 busy cores it was the one that built in
# minutes (IVF-PQ did not), and unlike PQ it returns true cosine scores; it keeps
# all vectors (400 MB at 1M x 100-d).
FAISS_APPROX_FROM = 1_000_000
FAISS_NPROBE = 64


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ModuleNotFoundError("--index faiss needs the optional package faiss-cpu: pip install faiss-cpu "
                                  "(or leave out --index for exact search in torch)") from None
    return faiss


def _unit_rows(x):
    """(N, D) -> L2-normalized float32 C-contiguous numpy, the layout FAISS wants."""
    return np.ascontiguousarray(F.normalize(_as_float_tensor(x), dim=-1).cpu().numpy(), dtype=np.float32)


def build_index(emb, approx_from=FAISS_APPROX_FROM, nprobe=FAISS_NPROBE, seed=0):
    """A FAISS inner-product index over the normalized rows of emb (N, D): cosine search.
    Exact below approx_from songs, IVF-Flat with ~sqrt(N) cells from it on."""
    faiss = _faiss()
    x = _unit_rows(emb)
    n, d = x.shape
    if n < approx_from:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = 2 ** round(math.log2(math.sqrt(n)))  # 1,024 cells at 1M songs
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        # 40 songs a cell train k-means as well as all of them would (FAISS warns below 39)
        sample = np.random.default_rng(seed).choice(n, min(n, 40 * nlist), replace=False)
        index.train(x[np.sort(sample)])
        faiss.extract_index_ivf(index).nprobe = nprobe
    index.add(x)
    return index


def index_path(spec, kind="audio"):
    """Where `embed --index faiss` saves the index of an embeddings spec: FOLDER/{kind}.faiss or NAME.faiss."""
    return os.path.join(spec, f"{kind}.faiss") if os.path.isdir(spec) else spec[:-len(".npy")] + ".faiss"


def load_index(path, n, dim, nprobe=FAISS_NPROBE):
    """A saved index, checked against the embeddings it claims to hold (n rows of dim)."""
    faiss = _faiss()
    index = faiss.read_index(path)
    if (index.ntotal, index.d) != (n, dim):
        raise ValueError(f"{path}: the index holds {index.ntotal} x {index.d} vectors but its embeddings are "
                         f"{n} x {dim}; rebuild it with `embed --index faiss`")
    if hasattr(faiss, "try_extract_index_ivf") and faiss.try_extract_index_ivf(index) is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe
    return index


def neighbours(queries, keys, k, index=None, batch_size=1024, progress=None):
    """Top-k keys by cosine for each query -> (scores (Q, k), rows (Q, k)) torch tensors, best first.
    index None: exact, cosine_topk in torch. A FAISS index over keys: its search; a row -1 (score
    -inf) is a slot an approximate index left empty."""
    if index is None:
        return cosine_topk(queries, keys, k, batch_size=batch_size, progress=progress)
    q = _unit_rows(queries)
    k = min(k, index.ntotal)
    scores, rows = [], []
    for start in range(0, len(q), batch_size):
        s, r = index.search(q[start:start + batch_size], k)
        scores.append(np.where(r >= 0, s, -np.inf))
        rows.append(r)
        if progress is not None:
            progress.update(len(r))
    return (torch.from_numpy(np.concatenate(scores)).float().reshape(-1, k),
            torch.from_numpy(np.concatenate(rows)).long().reshape(-1, k))


def search(query_emb, key_emb, k=10, exclude=None, index=None):
    """The k songs most cosine-similar to each query -> (scores (Q, k) float32, rows (Q, k) int64) numpy.

    query_emb (Q, D) and key_emb (N, D): arrays or tensors, normalized here. exclude: (Q,) key
    row that query q may not retrieve (the song itself, for a song-id query), -1 for none.
    index: a FAISS index over key_emb (build_index, load_index), None for exact search.
    Rows -1 with score -inf fill slots left empty (k > N, or an approximate index's miss).
    """
    scores, rows = neighbours(query_emb, key_emb, k + 1, index)  # one spare for the excluded song
    scores, rows = scores.numpy(), rows.numpy()
    width = min(k, rows.shape[1])
    if exclude is not None:
        drop = rows == np.asarray(exclude)[:, None]
        order = np.argsort(drop, axis=1, kind="stable")  # the excluded song, if listed, moves last
        rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
        drop = np.take_along_axis(drop, order, 1)
        rows, scores = np.where(drop, -1, rows), np.where(drop, -np.inf, scores)
    return scores[:, :width].astype(np.float32), rows[:, :width].astype(np.int64)


@torch.no_grad()
def embed_audio_files(model, paths, mode="full", batch_size=16):
    """Audio files, no catalog row or text needed -> (len(paths), D) float32 normalized audio
    embeddings: the computation embed_catalog does (eval mode, first 120 s, padded batches with a
    mask), so a catalog song's own file gets its catalog embedding back."""
    model.eval()
    device = next(model.parameters()).device
    collate = Collator(tokenizer=None)  # mels only: padding and masks, no tokenizer needed
    out = []
    for start in range(0, len(paths), batch_size):
        batch = collate([{"mel": song_mel(p)} for p in paths[start:start + batch_size]])
        mel, mask = batch["mel"].to(device), batch["padding_mask"].to(device)
        out.append(F.normalize(_encode_audio(model, mel, mask, mode, batch_size), dim=-1))
    return torch.cat(out).float().cpu().numpy()


def _saved_meta(spec):
    """meta.json of an `embed` folder ({} for NAME.npy or when absent)."""
    path = os.path.join(spec, "meta.json") if os.path.isdir(spec) else ""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def parse_queries(queries, song_ids, source):
    """Each --query -> ("file", path) or ("song", song_id). `id:X` forces a song id; a string that
    is both an existing file and a song id is an error, as is one that is neither."""
    out = []
    for q in queries:
        if q.startswith("id:") and q[3:] in song_ids:
            out.append(("song", q[3:]))
            continue
        is_file, is_song = os.path.isfile(q), q in song_ids
        if is_file and is_song:
            raise ValueError(f"--query {q}: both a file and a song_id of {source}; write ./{q} for the file "
                             f"or id:{q} for the song")
        if not is_file and not is_song:
            import difflib
            close = difflib.get_close_matches(q, song_ids, n=3) if len(song_ids) <= 100_000 else []
            hint = f" (close song_ids: {', '.join(close)})" if close else ""
            raise ValueError(f"--query {q}: no such file, and no song_id '{q}' in {source}{hint}")
        out.append(("file", q) if is_file else ("song", q))
    return out


SEARCH_COLUMNS = ("query", "rank", "song_id", "score", "title", "artists")


def write_search_results(path, records):
    """records (dicts with SEARCH_COLUMNS) -> path, CSV or JSON by its extension."""
    if path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1, ensure_ascii=False)
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=SEARCH_COLUMNS)
            w.writeheader()
            w.writerows(records)


def _search_keys(args, catalog, cache, model):
    """The songs searched -> (song_ids, (N, D) embeddings, saved index path or None, meta)."""
    if args.emb:
        if is_artifact(args.emb):
            raise ValueError(f"--emb {args.emb}: an artifact folder; pass it as --model, or give --emb the "
                             f"output of `embed`")
        ids, x = load_embeddings(args.emb)
        unknown = [i for i in ids if i not in catalog.index]
        if unknown:
            raise ValueError(f"{args.emb}: {len(unknown)} embedded songs are not in {catalog.path}, e.g. "
                             f"{', '.join(unknown[:5])}; was it embedded from another catalog?")
        return ids, x, index_path(args.emb), _saved_meta(args.emb)
    print(f"{args.model}: embedding {len(catalog)} songs; save them once with `embed` and pass --emb to skip this")
    x = embed_catalog(*model, catalog, cache=cache, batch_size=args.batch_size)["audio"]
    return [s.song_id for s in catalog.songs], x, None, {}


def cmd_search(args):
    if not args.model and not args.emb:
        raise ValueError("search: give --model ARTIFACT (embeds catalog and queries) or --emb SAVED (from "
                         "`embed`), or both")
    if args.out and not args.out.endswith((".csv", ".json")):
        raise ValueError(f"--out {args.out}: the format follows the extension, .csv or .json")
    if args.index == "faiss":
        _faiss()  # missing: say so now, not after embedding the catalog
    catalog, cache = _load(args)
    model = load_artifact(args.model, DEVICE, text=False) if args.model else None  # (model, None): audio only
    ids, keys, saved_index, meta = _search_keys(args, catalog, cache, model)
    row_of = {i: r for r, i in enumerate(ids)}
    queries = parse_queries(args.query, row_of, args.emb or catalog.path)
    files = [q for kind, q in queries if kind == "file"]
    file_emb = None
    if files:
        if not args.model:
            raise ValueError(f"--query {files[0]}: an audio file; embedding it needs --model ARTIFACT (the model "
                             f"that made {args.emb})")
        if meta.get("artifact") and os.path.abspath(args.model) != meta["artifact"]:
            print(f"search: warning: {args.emb} was embedded by {meta['artifact']}, the queries by "
                  f"{os.path.abspath(args.model)}; their cosines mean nothing unless it is the same model")
        file_emb = iter(embed_audio_files(model[0], files, meta.get("mode", "full"), args.batch_size))
    query_emb = np.stack([next(file_emb) if kind == "file" else keys[row_of[q]] for kind, q in queries])
    exclude = np.array([row_of[q] if kind == "song" else -1 for kind, q in queries])
    index = None
    if args.index == "faiss":
        if saved_index and os.path.exists(saved_index):
            index = load_index(saved_index, *keys.shape, nprobe=args.nprobe)
        else:
            print(f"search: building a FAISS index of {len(ids)} songs in memory"
                  + (f" (save it with `embed --index faiss`: no {saved_index})" if saved_index else ""))
            index = build_index(keys, nprobe=args.nprobe)
    scores, rows = search(query_emb, keys, args.k, exclude, index)
    records = []
    for (kind, q), s, r in zip(queries, scores, rows):
        table = []
        for rank, (score, row) in enumerate(((s_, r_) for s_, r_ in zip(s, r) if r_ >= 0), start=1):
            song = catalog[catalog.index[ids[row]]]
            records.append({"query": q, "rank": rank, "song_id": song.song_id, "score": round(float(score), 6),
                            "title": song.title, "artists": song.artists})
            table.append([rank, f"{score:.4f}", song.song_id, song.title, song.artists])
        print(f"\nsearch: {q} ({'audio file' if kind == 'file' else 'song id, itself left out'})")
        print(markdown_table(["rank", "score", "song_id", "title", "artists"], table))
    if args.out:
        write_search_results(args.out, records)
        print(f"search: {len(records)} rows -> {args.out}")
    return records


def _matching_index(spec, catalog, emb, args):
    """The saved FAISS index of an --emb when its rows are the catalog's, in order; else one built here."""
    saved = index_path(spec) if not is_artifact(spec) and (os.path.isdir(spec) or spec.endswith(".npy")) else None
    if saved and os.path.exists(saved):
        ids = read_ids(os.path.join(spec, "ids.txt") if os.path.isdir(spec) else spec[:-len(".npy")] + ".ids.txt")
        if ids == [s.song_id for s in catalog.songs]:
            return load_index(saved, *emb.shape, nprobe=args.nprobe)
        print(f"matching: {saved} indexes other songs or another order than {catalog.path}; building one here")
    return build_index(emb, nprobe=args.nprobe)


def add_search_parser(command):
    q = command("search", cmd_search, "similar songs: the top k of a catalog for audio files or song ids",
                source=False)
    q.add_argument("--catalog", required=True, help="catalog CSV/JSONL (data.py format): titles and artists, "
                   "and the songs searched when --emb is not given")
    q.add_argument("--query", action="append", required=True, metavar="FILE_OR_SONG_ID",
                   help="an audio file (no catalog row needed) or a song_id (left out of its own results; "
                        "id:X forces a song id); repeat for several")
    q.add_argument("--model", help="artifact folder (pretrain.py / finetune.py): embeds the audio-file queries, "
                   "and the catalog when --emb is not given")
    q.add_argument("--emb", help="embeddings saved by `embed` (a folder, or NAME.npy + NAME.ids.txt): the songs "
                   "searched, instead of embedding the catalog again")
    q.add_argument("--k", type=int, default=10, help="results per query")
    q.add_argument("--index", default="exact", choices=["exact", "faiss"],
                   help="exact: cosine top-k in torch; faiss: the index saved by `embed --index faiss` (built in "
                        "memory if absent; pip install faiss-cpu)")
    q.add_argument("--nprobe", type=int, default=FAISS_NPROBE,
                   help=f"cells an approximate FAISS index (>= {FAISS_APPROX_FROM:,} songs) scans per query")
    q.add_argument("--cache", help="log-mel cache folder (data.py prepare) for embedding the catalog")
    q.add_argument("--batch-size", type=int, default=16, help="songs per forward pass when embedding")
    q.add_argument("--out", help="also write one row per (query, rank) to this .csv or .json file")
    return q


# -----------------------------------------------------------------------------
# Table 2 over seeds (sample_data/table2.sh): each seed's report() results -> mean ± std,
# and the paper's qualitative claims (paper-notes "Qualitative claims") as targets, each
# judged on the means over seeds and printed as met / missed.

TABLE2_ROWS = (("Stage 1 (CLAP)", "stage1"), ("HTCL_w_CF", "htcl_w_cf"), ("HTCL_w/o_text", "htcl_wo_text"),
               ("HTCL", "htcl"), ("random", "random"))  # (row of the paper's table, report row name)
TABLE2_METRICS = (("ACC genre", "acc_genre"), ("ACC lang", "acc_language"), ("HR@100", "hr@100"),
                  ("CTR AUC", "ctr_auc"), ("CVR AUC", "cvr_auc"), ("Fig. 2 AUC", "fig2_auc"))


def aggregate_seeds(per_seed):
    """per_seed: report() results, one per seed, {row: {metric: value, or [mean, std] over probe/DIN runs}}
    -> {row: {metric: {"mean", "std", "per_seed"}}}: a seed's value is its own mean; the std is over
    seeds (ddof 1, mean_std). A metric is kept only where every seed has it."""
    out = {}
    for row in per_seed[0]:
        for metric in per_seed[0][row]:
            if not all(metric in seed.get(row, {}) for seed in per_seed):
                continue
            values = [seed[row][metric] for seed in per_seed]
            values = [v[0] if isinstance(v, (list, tuple)) else v for v in values]
            mean, std = mean_std(values)
            out.setdefault(row, {})[metric] = {"mean": mean, "std": std, "per_seed": values}
    return out


def table2_targets(agg):
    """The three claims of Table 2, on the means over seeds (agg from aggregate_seeds):
      1. HR@100 of HTCL >= 3 x that of stage 1;
      2. HTCL's genre and language ACC each >= stage 1's mean - stage 1's std (one line each);
      3. each ablation (HTCL_w_CF, HTCL_w/o_text) is below HTCL on semantic ACC: its mean genre
         ACC and its mean language ACC are both strictly below HTCL's (one line per ablation).
    -> list of {"target", "met", and the numbers compared}."""
    def get(row, metric):
        try:
            return agg[row][metric]
        except KeyError:
            raise KeyError(f"no {metric} for row {row!r} in every seed's report "
                           f"(rows: {', '.join(agg)})") from None
    hr, hr1 = get("htcl", "hr@100")["mean"], get("stage1", "hr@100")["mean"]
    targets = [{"target": "HR@100 of HTCL >= 3x stage 1", "htcl": hr, "stage1": hr1,
                "ratio": hr / hr1 if hr1 > 0 else float("inf"), "met": hr >= 3 * hr1}]
    for metric, what in (("acc_genre", "genre"), ("acc_language", "language")):
        s1 = get("stage1", metric)
        threshold = s1["mean"] - s1["std"]
        targets.append({"target": f"HTCL {what} ACC >= stage 1 - 1 std", "htcl": get("htcl", metric)["mean"],
                        "threshold": threshold, "met": get("htcl", metric)["mean"] >= threshold})
    for row, name in (("htcl_w_cf", "HTCL_w_CF"), ("htcl_wo_text", "HTCL_w/o_text")):
        gaps = {m: get(row, m)["mean"] - get("htcl", m)["mean"] for m in ("acc_genre", "acc_language")}
        targets.append({"target": f"{name} below HTCL on genre and language ACC", "minus_htcl": gaps,
                        "met": all(g < 0 for g in gaps.values())})
    return targets


def _target_line(t):
    if "ratio" in t:
        numbers = f"{100 * t['htcl']:.2f}% vs {100 * t['stage1']:.2f}% = {t['ratio']:.2f}x"
    elif "threshold" in t:
        numbers = f"{t['htcl']:.4f} vs {t['threshold']:.4f}"
    else:
        numbers = ", ".join(f"{m.split('_')[1]} {g:+.4f}" for m, g in t["minus_htcl"].items()) + " (minus HTCL)"
    return f"- {t['target']}: {numbers}: {'met' if t['met'] else 'missed'}"


def table2_over_seeds(per_seed, cosines=None, out_dir=None):
    """Table 2 as mean ± std over seeds, with the targets under it.

    per_seed: report() results (table2.json), one per seed; cosines: per seed, a figure2.npz's
    {"{row}/pos", "{row}/neg"} arrays or None. With out_dir, writes table2.md, table2.json
    ({"seeds", "rows", "targets"}) and figure2.png (histograms pooled over the seeds).
    -> (the Markdown text, the JSON dict)."""
    agg = aggregate_seeds(per_seed)
    missing = [key for _, key in TABLE2_ROWS if key not in agg]
    if missing:
        raise KeyError(f"rows {', '.join(missing)} missing from a seed's report (rows: {', '.join(agg)})")
    metrics = [(head, m) for head, m in TABLE2_METRICS if any(m in agg[key] for _, key in TABLE2_ROWS)]

    def cell(key, m):
        if m not in agg[key]:
            return "-"
        v = agg[key][m]
        if m == "hr@100":
            return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}%"
        return _pm((v["mean"], v["std"]))

    rows = [[name] + [cell(key, m) for _, m in metrics] for name, key in TABLE2_ROWS]
    targets = table2_targets(agg)
    text = (markdown_table(["Model"] + [head for head, _ in metrics], rows)
            + f"\n\nMean ± std over {len(per_seed)} seeds. Targets (on the means):\n"
            + "\n".join(_target_line(t) for t in targets))
    results = {"seeds": len(per_seed), "rows": {name: agg[key] for name, key in TABLE2_ROWS}, "targets": targets}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "table2.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out_dir, "table2.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)
        if cosines and all(c is not None for c in cosines):
            pooled = {name: tuple(np.concatenate([c[f"{key}/{side}"] for c in cosines]) for side in ("pos", "neg"))
                      for name, key in TABLE2_ROWS if all(f"{key}/pos" in c for c in cosines)}
            plot_histograms(pooled, os.path.join(out_dir, "figure2.png"))
    return text, results


# -----------------------------------------------------------------------------
# Command line. Each sub-command loads the catalog and every --emb once, runs
# one protocol, prints a Markdown table and its wall time, and can save JSON.


def _name(spec):
    """Row name of an --emb: the file or folder name; an artifact's final/ folder is named after
    its run (runs/demo/pretrain/final -> pretrain), so stage-1 and stage-2 rows differ."""
    path = os.path.normpath(spec)
    base = os.path.basename(path)
    if base == "final" and os.path.dirname(path):
        base = os.path.basename(os.path.dirname(path))
    return base[:-len(".npy")] if base.endswith(".npy") else base


def _names(specs):
    """Unique row names, in order; a clash falls back to the full spec."""
    out = []
    for spec in specs:
        out.append(_name(spec) if _name(spec) not in out else spec)
    return out


def _load(args):
    catalog = load_catalog(args.catalog)
    cache = MelCache.open(args.cache, catalog) if getattr(args, "cache", None) else None
    return catalog, cache


def _embeddings(args, catalog, cache):
    """{name: (len(catalog), D)} for each --emb, in the order given."""
    return {name: song_embeddings(spec, catalog, args.kind, args.mode, cache, args.batch_size)
            for name, spec in zip(_names(args.emb), args.emb)}


def _column(catalog, column):
    if column not in catalog.columns:
        raise SystemExit(f"{catalog.path}: no column '{column}' (columns: {', '.join(catalog.columns)})")
    return [catalog.label(r, column) for r in range(len(catalog))]


def cmd_embed(args):
    if args.index == "faiss":
        _faiss()  # missing: say so before embedding, not after
    catalog, cache = _load(args)
    rows = split_rows(catalog, args.split) if args.split != "all" else list(range(len(catalog)))
    kinds = ["audio"] + ["text"] * args.text + ["fused"] * args.fused
    model, tokenizer = load_artifact(args.artifact, DEVICE, text=kinds != ["audio"])
    mode = args.mode or model.cfg.embed_mode  # an explicit --mode wins over what the artifact was trained for
    embs = embed_catalog(model, tokenizer, catalog, rows, mode, kinds, cache, args.batch_size)
    meta = {"artifact": os.path.abspath(args.artifact), "catalog": os.path.abspath(args.catalog), "mode": mode,
            "split": args.split, "kinds": kinds,
            "chunk_frames": seconds_to_frames(model.cfg.chunk_seconds) if mode == "chunked" else None}
    save_embeddings(args.out, [catalog[r].song_id for r in rows], embs, meta)
    for kind, x in embs.items():  # an index of embeddings written before would now be stale
        path = index_path(args.out, kind)
        if args.index == "faiss":
            _faiss().write_index(build_index(x), path)
            print(f"embed: FAISS index of {kind} -> {path}")
        elif os.path.exists(path):
            os.remove(path)
    print(f"embed: {len(rows)} songs x {', '.join(f'{k} {v.shape[1]}-d' for k, v in embs.items())} -> {args.out}")
    return {"songs": len(rows), "kinds": kinds, "out": args.out}


def probe_split(catalog, column="split", random_fraction=None):
    """The probe's train/test split, shared by `probe` and `report` -> (split per row or None, note).
    The catalog's split column when it has one (and no random fraction is asked for); otherwise
    None: run_probe then holds out a seeded random fraction per seed (the same draws in both)."""
    if random_fraction is None and column in catalog.columns:
        return [catalog.label(r, column) for r in range(len(catalog))], None
    fraction = random_fraction or PROBE_TEST_FRACTION
    why = "as asked" if random_fraction is not None else f"{catalog.path} has no '{column}' column"
    return None, f"probe: {why}: each seed holds out its own seeded random {fraction:.0%} of songs as test"


PROBE_TEST_FRACTION = 0.2  # run_probe's held-out share when the catalog has no split


def cmd_probe(args):
    catalog, cache = _load(args)
    split, note = probe_split(catalog, args.split_column, args.random_split)
    if note:
        print(note)
    results, rows = {}, []
    for name, emb in _embeddings(args, catalog, cache).items():
        for column in args.label or ["genre", "language"]:
            r = run_probe(emb, _column(catalog, column), split, args.train_split, args.test_split,
                          seeds=range(args.seeds), test_fraction=args.random_split or PROBE_TEST_FRACTION,
                          hidden=args.hidden, epochs=args.epochs, lr=args.lr)
            results[f"{name}/{column}"] = r
            rows.append([name, column, _pm(r["acc"]), _pm(r["macro_f1"]), f"{r['majority']:.4f}",
                         r["n_classes"], f"{r['n_train']}/{r['n_test']}"])
    print(markdown_table(["emb", "label", "accuracy", "macro-F1", "majority", "classes", "train/test"], rows))
    return results


def cmd_matching(args):
    catalog, cache = _load(args)
    triggers, targets, _, stats = sample_matching_cases(load_favourites(args.favourites, catalog), args.triggers,
                                                        args.seed)
    print(f"matching: {stats['eligible']} of {stats['users']} users have > {args.triggers} distinct favourites"
          f" ({stats['duplicates']} repeated favourites counted once); chance HR@{args.list_size} "
          f"~ {matching_chance(len(catalog), args.triggers, args.per_trigger, args.list_size):.4f}")
    if stats["eligible"] == 0:
        raise SystemExit(f"{args.favourites}: no user has more than {args.triggers} favourites; lower --triggers")
    if args.index == "faiss":
        _faiss()
    results, rows = {}, []
    specs = dict(zip(_names(args.emb), args.emb))
    for name, emb in _embeddings(args, catalog, cache).items():
        t0 = time.time()
        index = _matching_index(specs[name], catalog, emb, args) if args.index == "faiss" else None
        hits = matching_hits(emb, triggers, targets, args.per_trigger, args.list_size, args.merge, index=index)
        results[name] = {"hr": float(hits.float().mean()), "users": len(hits), "seconds": time.time() - t0}
        rows.append([name, f"{100 * results[name]['hr']:.2f}%", len(hits), f"{results[name]['seconds']:.1f}"])
    print(markdown_table(["emb", f"HR@{args.list_size}", "users", "seconds"], rows))
    return results


def cmd_matching_benchmark(args):
    r = matching_benchmark(args.songs, args.users, args.dim)
    print(f"matching-benchmark: {r['songs']} songs x {r['users']} users, D={r['dim']}, {r['threads']} threads: "
          f"{r['seconds']:.1f} s (HR@100 {r['hr@100']:.4f}, chance {100 / r['songs']:.4f})")
    return r


def cmd_ranking(args):
    catalog, cache = _load(args)
    imp = read_impressions(args.impressions, catalog)
    results, rows = {}, []
    for name, emb in _embeddings(args, catalog, cache).items():
        for task in args.task:
            r = run_ranking(emb, imp, task, args.train_days, args.test_day, args.behaviour, args.max_len,
                            seeds=range(args.seeds), epochs=args.epochs, lr=args.lr, freeze_items=args.freeze_items)
            results[f"{name}/{task}"] = r
            rows.append([name, task.upper(), _pm(r["auc"]), r["n_train"], r["n_test"], f"{r['positive_rate']:.3f}"])
    print(markdown_table(["emb", "task", "AUC (day test)", "train", "test", "positive rate"], rows))
    return results


def cmd_distance(args):
    catalog, cache = _load(args)
    if args.pairs:
        anchors, songs, positive = read_labelled_pairs(args.pairs, catalog)
    elif args.impressions:
        anchors, songs, positive = pairs_from_impressions(read_impressions(args.impressions, catalog))
    else:
        raise SystemExit("distance: give --pairs (anchor,song,label) or --impressions")
    if positive.all() or not positive.any():
        raise SystemExit(f"distance: {positive.sum()} positive and {(~positive).sum()} negative pairs; need both")
    results, rows, cosines = {}, [], {}
    for name, emb in _embeddings(args, catalog, cache).items():
        cos = pair_cosines(emb, anchors, songs)
        cosines[name] = (cos[positive], cos[~positive])
        results[name] = separation(*cosines[name])
        rows.append([name, f"{results[name]['mean_gap']:+.4f}", f"{results[name]['auc']:.4f}",
                     f"{results[name]['n_pos']}/{results[name]['n_neg']}"])
    print(markdown_table(["emb", "mean(pos) - mean(neg)", "AUC pos vs neg", "pos/neg pairs"], rows))
    plot_histograms(cosines, args.out, args.bins)
    print(f"distance: histograms -> {args.out}")
    return results


def _own_artifact(spec):
    """The artifact an --emb came from: itself, or the one an `embed` folder's meta.json names."""
    if is_artifact(spec):
        return spec
    meta = os.path.join(spec, "meta.json")
    if os.path.isdir(spec) and os.path.exists(meta):
        with open(meta) as f:
            artifact = json.load(f).get("artifact")
        return artifact if artifact and is_artifact(artifact) else None
    return None


def cmd_retrieval(args):
    catalog, cache = _load(args)
    embs = _embeddings(args, catalog, cache)
    # T2M text tower of each --emb: --artifact for all, else the model's own (an artifact, or the artifact
    # of an embed folder), else (random, other models' files) the first own tower found
    own = [_own_artifact(s) for s in args.emb]
    fallback = next((a for a in own if a), None)
    towers = {name: args.artifact or a or fallback for name, a in zip(embs, own)}
    loaded = {}
    text_tower = any(towers.values())
    # songs searched (and searching): the whole catalog, or one split of it
    keep = np.arange(len(catalog)) if args.split == "all" else np.array(split_rows(catalog, args.split), dtype=int)
    if len(keep) < 2:
        raise SystemExit(f"retrieval: {len(keep)} songs in split '{args.split}' of {catalog.path}")
    exclude = None if not args.exclude_same else np.asarray(_column(catalog, args.exclude_same), dtype=object)[keep]
    results, rows = {}, []
    for name, emb in embs.items():
        emb = emb[keep]
        for column in args.tag:
            tags = np.asarray(_column(catalog, column), dtype=object)[keep]
            m2m, n = music_to_music_map(emb, tags, args.k, exclude_same=exclude)
            results[f"{name}/{column}/m2m"] = {f"mAP@{args.k}": m2m, "queries": n}
            rows.append([name, f"M2M {column}", f"mAP@{args.k} {m2m:.4f}", n])
            values = sorted(set(tags) - {""})
            queries = None
            if args.tag_emb:
                ids, x = load_embeddings(args.tag_emb)
                queries = align(ids, x, values, args.tag_emb, what="tag")
            elif towers[name]:
                if towers[name] not in loaded:
                    loaded[towers[name]] = load_artifact(towers[name], DEVICE)
                texts = [args.template.format(value=v, column=column) for v in values]
                queries = embed_texts(*loaded[towers[name]], texts)
            if queries is not None:
                t2m = text_to_music(queries, values, emb, tags)
                results[f"{name}/{column}/t2m"] = t2m
                scores = ", ".join(f"{k} {v:.4f}" for k, v in t2m.items() if k != "queries")
                rows.append([name, f"T2M {column}", scores, t2m["queries"]])
        artist_column = args.artist_column
        if artist_column is None:  # default: artist_id when the catalog has it
            artist_column = "artist_id" if "artist_id" in catalog.columns else ""
        if artist_column:
            sa = same_artist_stats(emb, np.asarray(_column(catalog, artist_column), dtype=object)[keep], args.k,
                                   exclude_same=exclude)
            results[f"{name}/same_artist"] = sa
            rows.append([name, f"same artist in top {args.k}",
                         f"{100 * sa['share_with_same_artist']:.2f}% of queries, {sa['mean_same_artist']:.2f} songs "
                         f"on average ({sa['mean_same_artist_given_any']:.2f} where any)", sa["queries"]])
    print(markdown_table(["emb", "protocol", "score", "queries"], rows))
    if not text_tower and not args.tag_emb:
        print("retrieval: T2M skipped (no text tower: pass --artifact or --tag-emb)")
    return results


def cmd_artist_graph(args):
    artists, split, edges = read_artist_graph(args.edges, args.artist_split)
    features = {}
    for f in args.features:
        if f == "mean":
            if not args.emb or not args.catalog:
                raise SystemExit("artist-graph --features mean needs --catalog and --emb")
            catalog, cache = _load(args)
            for name, emb in _embeddings(args, catalog, cache).items():
                features[f"mean({name})"] = artist_features("mean", artists, catalog, emb, args.artist_column)
        else:
            features[f] = artist_features(f, artists, dim=args.random_dim)
    cfg = ArtistGraphConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ArtistGraphConfig)})
    graphs = message_passing_graphs(edges, split, cfg.undirected)
    print(f"artist-graph: {len(artists)} artists, {graphs['pairs'].shape[1] // 2} train-train edges; message "
          f"passing {'both ways' if cfg.undirected else 'first column -> second'}: "
          f"{graphs[args.eval_split].shape[1]} directed edges in the {args.eval_split} graph; "
          f"{graphs['truth_' + args.eval_split].shape[1] // 2} hidden {args.eval_split}-{args.eval_split} edges")
    log = (lambda line: print(line, file=sys.stderr)) if args.verbose else None  # noqa: E731
    results = {}
    for name, x in features.items():
        results[name] = artist_graph_ndcg(x, edges, split, args.eval_split, args.layers, args.k,
                                          seeds=range(args.seeds), cfg=cfg, log=log)
    std, released = f"ndcg@{args.k}", f"ndcg@{args.k}_released_formula"
    print(markdown_table(["layers"] + [f"{f} {m}" for f in features for m in (std, released)],
                         [[n] + [_pm(results[f][n][m]) for f in features for m in (std, released)]
                          for n in args.layers]))
    print(f"{std}: standard NDCG; {released}: the released code's formula (one ideal item too many), which the "
          f"paper reports. Epochs run: " + "; ".join(f"{f} {[results[f][n]['epochs'] for n in args.layers]}"
                                                      for f in features))
    return {f: {str(n): v for n, v in r.items()} for f, r in results.items()}


def add_artist_graph_flags(q):
    """One flag per ArtistGraphConfig field (--early-stop, --undirected, ...), default from the dataclass."""
    for f in dataclasses.fields(ArtistGraphConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            q.add_argument(flag, action="store_true", help=f"(default {f.default})")
        else:
            q.add_argument(flag, type=type(f.default), default=f.default, help=f"(default {f.default})")


def cmd_report(args):
    catalog, cache = _load(args)
    sources = dict(zip(_names(args.emb), args.emb))
    table = report(sources, catalog, args.favourites, args.impressions, args.pairs, args.out, args.kind, args.mode,
                   cache, probe_seeds=range(args.probe_seeds), ranking_seeds=range(args.ranking_seeds),
                   n_triggers=args.triggers, workers=args.workers, reuse=args.reuse)
    print(table)
    print(f"report: {args.out}/table2.md" + (f", {args.out}/figure2.png" if args.pairs or args.impressions else ""))
    return {"table": table}


def cmd_table2(args):
    per_seed, cosines = [], []
    for folder in args.reports:
        path = os.path.join(folder, "table2.json")
        if not os.path.exists(path):
            raise SystemExit(f"table2: {path} not found (run evaluate.py report --out {folder} first)")
        with open(path) as f:
            per_seed.append(json.load(f))
        npz = os.path.join(folder, "figure2.npz")
        cosines.append(dict(np.load(npz)) if os.path.exists(npz) else None)
    try:
        text, results = table2_over_seeds(per_seed, cosines, args.out)
    except KeyError as e:
        raise SystemExit(f"table2: {e.args[0]}") from None
    print(text)
    return results


def _days(s):
    try:
        if "-" in s:
            a, b = (int(v) for v in s.split("-"))
            return list(range(a, b + 1))
        return [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"days as a range 1-7 or a list 1,2,3; got {s!r}") from None


class _Parser(argparse.ArgumentParser):
    """Every sub-command's parser: -h shows each option's default, abbreviations are refused."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)


def build_parser():
    p = _Parser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, fn, help, source=True):
        q = sub.add_parser(name, help=help, description=help)
        q.set_defaults(fn=fn)
        q.add_argument("--json", help="also write the results to this JSON file")
        if source:
            q.add_argument("--catalog", required=True, help="catalog CSV/JSONL (data.py format)")
            q.add_argument("--emb", action="append", required=True,
                           help="embeddings: embed folder, NAME.npy (+ NAME.ids.txt), artifact folder, or "
                                "random[:D]; repeat to compare")
            q.add_argument("--kind", default="audio", choices=KINDS, help="which embedding of a folder/artifact")
            q.add_argument("--mode", default=None, choices=["full", "chunked"],
                           help="an artifact embedded on the fly: whole song (HTCL) or mean of 10 s chunks "
                                "(CrossMuSim); default: the mode the artifact was trained for")
            q.add_argument("--cache", help="log-mel cache folder (data.py prepare) for artifacts")
            q.add_argument("--batch-size", type=int, default=16, help="songs per forward pass when embedding")
        return q

    q = command("embed", cmd_embed, "write song embeddings of a catalog (ids.txt + audio/text/fused .npy)",
                source=False)
    q.add_argument("--artifact", required=True, help="folder written by pretrain.py / finetune.py")
    q.add_argument("--catalog", required=True, help="catalog CSV/JSONL (data.py format)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--mode", default=None, choices=["full", "chunked"],
                   help="full: whole song (120 s) at once (HTCL); chunked: mean of 10 s windows (CrossMuSim); "
                        "default: the mode the artifact was trained for (config.json embed_mode)")
    q.add_argument("--text", action="store_true", help="also write text.npy (text tower)")
    q.add_argument("--fused", action="store_true", help="also write fused.npy (fusion MLP, stage 2)")
    q.add_argument("--split", default="all", choices=["all", "train", "val", "test"], help="which catalog rows")
    q.add_argument("--cache", help="log-mel cache folder (data.py prepare); without it audio is decoded here")
    q.add_argument("--batch-size", type=int, default=16, help="songs per forward pass")
    q.add_argument("--index", default="none", choices=["none", "faiss"],
                   help="faiss: also save a FAISS index of each kind (KIND.faiss) for `search`/`matching "
                        "--index faiss`; exact below 1M songs, IVF from 1M on (pip install faiss-cpu)")

    add_search_parser(command)

    q = command("probe", cmd_probe, "semantic tasks: MLP probe accuracy / macro-F1 on frozen embeddings (HTCL)")
    q.add_argument("--label", action="append", default=None, help="label column(s); none given: genre, language")
    q.add_argument("--split-column", default="split",
                   help="column with train/test; a catalog without it gets a seeded random split (as report)")
    q.add_argument("--train-split", default="train", help="value of the split column that trains the probe")
    q.add_argument("--test-split", default="test", help="value of the split column that scores it")
    q.add_argument("--random-split", type=float, default=None, metavar="FRACTION",
                   help="ignore the split column: each seed holds out this random fraction")
    q.add_argument("--seeds", type=int, default=5, help="runs; mean ± std is reported")
    q.add_argument("--hidden", type=int, default=512, help="hidden width; 0 = linear probe")
    q.add_argument("--epochs", type=int, default=100,
                   help=f"training epochs (at least {PROBE_MIN_STEPS} steps on small sets)")
    q.add_argument("--lr", type=float, default=PROBE_LR, help="AdamW learning rate")

    q = command("matching", cmd_matching, "next-item HR@K from a favourites log (HTCL matching)")
    q.add_argument("--favourites", required=True, help="CSV user_id,song_id,timestamp")
    q.add_argument("--triggers", type=int, default=30, help="favourites before the target, the triggers (paper: 30)")
    q.add_argument("--per-trigger", type=int, default=10, help="neighbours retrieved per trigger (paper: 10)")
    q.add_argument("--list-size", type=int, default=100, help="K of HR@K (paper: 100)")
    q.add_argument("--merge", default="best", choices=["best", "round-robin"],
                   help="how candidates become one list (paper silent; our reading: best cosine)")
    q.add_argument("--seed", type=int, default=0, help="draws each user's target")
    q.add_argument("--index", default="exact", choices=["exact", "faiss"],
                   help="neighbour search: exact cosine in torch, or the FAISS index `embed --index faiss` saved "
                        "(built in memory if absent)")
    q.add_argument("--nprobe", type=int, default=FAISS_NPROBE, help="cells an approximate FAISS index scans")

    q = sub.add_parser("matching-benchmark", help="time matching on random vectors (default 100k songs x 10k users)")
    q.set_defaults(fn=cmd_matching_benchmark)
    q.add_argument("--json", help="also write the results to this JSON file")
    q.add_argument("--songs", type=int, default=100_000, help="random songs")
    q.add_argument("--users", type=int, default=10_000, help="random users, 31 favourites each")
    q.add_argument("--dim", type=int, default=100, help="embedding width")

    q = command("ranking", cmd_ranking, "DIN CTR / CVR AUC with item embeddings from the representations (HTCL)")
    q.add_argument("--impressions", required=True, help="CSV user_id,song_id,day,clicked,favoured")
    q.add_argument("--task", nargs="+", default=["ctr", "cvr"], choices=["ctr", "cvr"], help="which AUCs")
    q.add_argument("--train-days", type=_days, default=list(range(1, 8)), help="days that train DIN: 1-7 or 1,2,3")
    q.add_argument("--test-day", type=int, default=8, help="day whose impressions are scored")
    q.add_argument("--behaviour", default="clicked", choices=["clicked", "favoured"],
                   help="what forms the user's behaviour sequence (songs on earlier days)")
    q.add_argument("--max-len", type=int, default=50, help="most recent behaviours kept")
    q.add_argument("--epochs", type=int, default=2, help="DIN training epochs")
    q.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    q.add_argument("--seeds", type=int, default=1, help="runs; mean ± std is reported")
    q.add_argument("--freeze-items", action="store_true", help="keep item embeddings fixed (default: fine-tuned)")

    q = command("distance", cmd_distance, "Figure 2: cosine histograms of positive vs negative pairs")
    q.add_argument("--pairs", help="CSV anchor,song,label (positive/negative or 1/0)")
    q.add_argument("--impressions", help="derive pairs from an impressions log instead (see pairs_from_impressions)")
    q.add_argument("--out", default="figure2.png", help="PNG path")
    q.add_argument("--bins", type=int, default=50, help="histogram bins over [-1, 1]")

    q = command("retrieval", cmd_retrieval, "CrossMuSim: M2M mAP@K, T2M R@1/R@5/mAP@10, same-artist leakage")
    q.add_argument("--tag", action="append", required=True,
                   help="tag column; repeat for several, e.g. genre (coarse), subgenre (fine)")
    q.add_argument("--k", type=int, default=100, help="K of M2M mAP@K and of the same-artist top K")
    q.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                   help="search within these catalog rows only")
    q.add_argument("--artist-column", default=None,
                   help="column naming a song's artist (default: artist_id if present; '' skips the statistic)")
    q.add_argument("--artifact", help="text tower for T2M queries of every --emb (default: each model's own "
                                      "artifact; for random and plain files the first one given)")
    q.add_argument("--tag-emb", help="T2M query embeddings NAME.npy whose ids file holds the tag values")
    q.add_argument("--template", default="{value}", help="T2M query text, e.g. '{column}: {value}'")
    q.add_argument("--exclude-same", metavar="COLUMN", default=None,
                   help="leakage control: songs sharing the query's value of COLUMN (e.g. artist_id) are neither "
                        "positives nor candidates in M2M and the same-artist statistic")

    q = sub.add_parser("artist-graph", help="GraphSAGE artist similarity NDCG@200 over 0-4 layers (Grotschla et al.)")
    q.set_defaults(fn=cmd_artist_graph)
    q.add_argument("--json", help="also write the results to this JSON file")
    q.add_argument("--edges", required=True, help="CSV artist_a,artist_b")
    q.add_argument("--artist-split", required=True, help="CSV artist_id,split")
    q.add_argument("--features", action="append", required=True,
                   help="mean (of each artist's --emb song embeddings), random, or NAME.npy with NAME.ids.txt "
                        "holding artist ids; repeat to compare")
    q.add_argument("--catalog", help="needed for --features mean")
    q.add_argument("--emb", action="append", help="song embeddings for --features mean")
    q.add_argument("--kind", default="audio", choices=KINDS, help="which embedding of an --emb folder/artifact")
    q.add_argument("--mode", default=None, choices=["full", "chunked"],
                   help="how an --emb artifact is embedded on the fly (default: the artifact's embed_mode)")
    q.add_argument("--cache", help="log-mel cache folder for an --emb artifact")
    q.add_argument("--batch-size", type=int, default=16,
                   help="songs per forward pass when an --emb artifact is embedded on the fly (the GNN itself "
                        "takes full-graph steps)")
    q.add_argument("--artist-column", default="artist_id", help="catalog column naming a song's artist")
    q.add_argument("--eval-split", default="test", choices=["test", "val"],
                   help="artists scored; their mutual edges are hidden")
    q.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="GraphSAGE depths compared")
    q.add_argument("--k", type=int, default=200, help="K of NDCG@K")
    q.add_argument("--seeds", type=int, default=1, help="training seeds; mean ± std is reported")
    q.add_argument("--random-dim", type=int, default=2613, help="width of --features random (released: 2613)")
    q.add_argument("--verbose", action="store_true", help="print a line per epoch (losses, lr) on stderr")
    add_artist_graph_flags(q)

    q = command("report", cmd_report, "Table 2 (ACC genre/lang, HR@100, CTR/CVR AUC) and Figure 2 for several models")
    q.add_argument("--favourites", help="CSV user_id,song_id,timestamp: HR@100 (without it: '-')")
    q.add_argument("--impressions", help="CSV user_id,song_id,day,clicked,favoured: CTR/CVR AUC, and Figure 2 "
                                         "pairs when --pairs is not given (without both: '-')")
    q.add_argument("--pairs", help="Figure 2 pairs: CSV anchor,song,label, or stage-2 trigger_song_id,rec_song_id")
    q.add_argument("--triggers", type=int, default=30, help="matching: favourites before the target (paper: 30)")
    q.add_argument("--out", default="report", help="output folder")
    q.add_argument("--probe-seeds", type=int, default=5, help="probe runs per embedding (mean ± std)")
    q.add_argument("--ranking-seeds", type=int, default=1, help="DIN runs per embedding; 0 skips the ranking columns")
    q.add_argument("--workers", type=int, default=0, help="threads that train the probes and DIN models side "
                   "by side; results do not depend on it. 0: the available cores, at most 8")
    q.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="take a probe or DIN result from OUT/results.json when its embeddings and inputs match "
                        "exactly; --no-reuse retrains every one")

    q = sub.add_parser("table2", allow_abbrev=False, help="Table 2 over seeds: mean ± std of per-seed reports, "
                       "and the paper's qualitative claims as met/missed targets (sample_data/table2.sh)")
    q.set_defaults(fn=cmd_table2, json=None)
    q.add_argument("reports", nargs="+", help="report folders (evaluate.py report --out), one per seed; their "
                   "rows named " + ", ".join(key for _, key in TABLE2_ROWS))
    q.add_argument("--out", required=True, help="folder for table2.md, table2.json and figure2.png")
    return p


def main(argv=None):
    """Run one sub-command. Errors are exceptions here (tests catch them); the command line (cli)
    turns the known ones into one line."""
    args = build_parser().parse_args(argv)
    t0 = time.time()
    results = args.fn(args)
    seconds = time.time() - t0
    print(f"{args.command}: {seconds:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": args.command, "seconds": seconds, "results": results}, f, indent=2,
                      default=_jsonable)
    return results


def _jsonable(x):
    if isinstance(x, np.ndarray) or torch.is_tensor(x):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, range):
        return list(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def cli(argv=None):
    """main() with data.py's top-level handling: a known error (bad file, row, key or value) prints
    `Error: ...`, which names the file, row or key, and exits 1; a traceback would add nothing."""
    try:
        return main(argv)
    except (ValueError, OSError, ImportError) as e:  # CatalogError, AudioError: ValueErrors; FileNotFoundError:
        # an OSError; ImportError: an optional extra that is not installed (--index faiss)
        raise SystemExit(f"Error: {e}") from None


if __name__ == "__main__":
    cli()
