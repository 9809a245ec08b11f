"""The HTCL paper's own evaluation protocols, on plain song-embedding matrices.

Where each protocol lives (paper, section -> sub-command: functions):

  HTCL Sec. 3.1.3 semantic tasks, MLP probe ACC      -> probe:        run_probe
  HTCL Sec. 3.1.3 matching, next-item HR@100         -> matching:     sample_matching_cases, matching_hits
  HTCL Sec. 3.1.3 ranking, DIN CTR / CVR AUC         -> ranking:      build_din_examples, DIN, run_ranking
  HTCL Figure 2, cosine of favoured vs not           -> distance:     pair_cosines, separation, plot_histograms
  HTCL Table 2 and Figure 2 in one go                -> report:       report
  Table 2 as mean ± std over seeds, with targets     -> table2:       table2_over_seeds (sample_data/table2.sh)
  song embeddings, full song or 10 s chunks          -> embed:        embed_catalog (--shards: evals/embed_shards.py)
  HR@100 timing, 100k songs x 10k random vectors     -> matching-benchmark: matching_benchmark

The rest lives in evals/; this command line dispatches its sub-commands there:
  evals/crossmusim.py    CrossMuSim M2M mAP@100, T2M R@1/R@5/mAP@10, same-artist leakage -> retrieval
  evals/artist_graph.py  Grotschla et al. (MuRS 2024) GraphSAGE artist similarity NDCG@200 -> artist-graph
  evals/search.py        similar songs for audio files or song ids, exact or FAISS       -> search
  evals/metrics.py, evals/embeddings.py: the shared metrics; what `--emb SPEC` reads (repeat it to
                         compare models: an `embed` folder, NAME.npy + .ids.txt, an artifact, random[:D])

Commands (from the repo root, on the bundled synthetic world; A = a trained artifact folder):
  python evaluate.py embed --artifact A --catalog sample_data/catalog.csv --out emb/htcl --text --fused
  python evaluate.py probe --catalog sample_data/catalog.csv --emb emb/htcl --emb random --label genre
  python evaluate.py matching --catalog sample_data/catalog.csv --emb emb/htcl --favourites sample_data/favourites.csv
  python evaluate.py ranking --catalog sample_data/catalog.csv --emb emb/htcl --impressions sample_data/impressions.csv
  python evaluate.py distance --catalog sample_data/catalog.csv --emb emb/clap --emb emb/htcl \
      --impressions sample_data/impressions.csv --out figure2.png        # or --pairs anchor,song,label CSV
  python evaluate.py report --catalog sample_data/catalog.csv --emb emb/clap --emb emb/htcl \
      --favourites sample_data/favourites.csv --impressions sample_data/impressions.csv --out report/
  python evaluate.py table2 runs/table2/s3407/report runs/table2/s3408/report --out runs/table2  # over seeds
Every sub-command prints a Markdown table and its wall time; --json FILE saves the numbers; -h shows
every option with its default. Flags: --batch_size (--batch-size still accepted). A bad file, row,
key or value stops the command line with one `Error: ...` line naming it (exit 1), as data.py does.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import load_favourites, seconds_to_frames, split_rows
from evals import artist_graph, crossmusim, embed_shards, search
from evals.baselines import BASELINES_HELP, health_lines, with_baselines
from evals.embeddings import (add_command, catalog_column, embedding_provenance, embeddings_of,
                              fraction, is_artifact, load_inputs, non_negative_int, positive_float, positive_int,
                              read_impressions, read_json, read_labelled_pairs, row_names, save_embeddings,
                              song_embeddings)
from evals.metrics import (as_float_tensor, auc, available_cores, macro_f1, markdown_table, mean_std, one_thread,
                           plus_minus, progress_bar)
from evals.search import catalog_index, neighbours, require_faiss
from model import load_artifact


# Models built from the global RNG (torch.manual_seed(seed), then the module) are built under this
# lock: report() trains probes and DIN models on several threads at once, and a seed is only
# reproducible if no other thread draws between the seeding and the last initial weight.
_SEEDED_INIT = threading.Lock()


# -----------------------------------------------------------------------------
# Semantic tasks (HTCL Sec. 3.1.3): a single-layer MLP on frozen embeddings, accuracy for genre
# and for language (report --label: any catalog column).

# The probe's optimizer. The probes were most of the demo report's time (1000 steps at lr 1e-3
# per label, model and seed). At 3x the lr, 300 steps give the same accuracy on the demo's 6 probes
# within 0.010 (0.015 fused; one of 66 test songs is 0.015; std over seeds 0.00-0.045) in 0.3 of
# the time; 200 steps at lr 1e-3 moved genre ACC by -0.043 and +0.049 (docs/EXPERIMENTS.md).
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
    "chance" (the test set's majority share: the commonest test label's, mean over splits), ...}.
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
    accs, f1s, chance = [], [], []
    for group, train, test in groups:
        if train.sum() == 0 or test.sum() == 0:
            raise ValueError(f"probe needs both splits non-empty: {train.sum()} train rows "
                             f"('{train_split}'), {test.sum()} test rows ('{test_split}')")
        classes = sorted(set(labels[train]))
        index = {c: i for i, c in enumerate(classes)}
        # A test label never seen in training cannot be predicted: it stays in the
        # denominator (counted wrong) rather than being dropped.
        y_test = np.array([index.get(c, -1) for c in labels[test]])
        chance.append(np.unique(labels[test], return_counts=True)[1].max() / test.sum())
        for y_pred in train_probes(emb[train], [index[c] for c in labels[train]], emb[test], len(classes),
                                   seeds=group, **train_kw):
            accs.append(float((y_pred == y_test).mean()))
            f1s.append(macro_f1(y_test, y_pred))
    unseen = int((y_test == -1).sum())
    return {"acc": mean_std(accs), "macro_f1": mean_std(f1s), "n_train": int(train.sum()),
            "n_test": int(test.sum()), "n_classes": len(classes), "unseen_test_labels": unseen,
            "chance": float(np.mean(chance)), "per_seed_acc": accs}


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
    bar = progress_bar(len(unique), "matching: neighbours of trigger songs") if progress else None
    nb_score, nb_index = neighbours(as_float_tensor(emb)[unique], emb, per_trigger + T, index, batch_size,
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


def matching_benchmark(n_songs=100_000, n_users=10_000, dim=100, n_triggers=30, seed=0):
    """Wall time of matching_hits on random unit vectors and random histories (100k songs x 10k users by default)."""
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
        model = DIN(F.normalize(as_float_tensor(item_emb), dim=1), freeze_items=freeze_items)
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
    if len(train["label"]) == 0 or len(test["label"]) == 0 or test_day in train_days:  # the last: a leak
        raise ValueError(f"ranking {task}: {len(train['label'])} training impressions on days {list(train_days)}, "
                         f"{len(test['label'])} test impressions on day {test_day}; both must be non-empty, "
                         f"and the test day no training day")
    aucs = [train_din(item_emb, train, test, seed=s, **train_kw)[0] for s in seeds]
    return {"auc": mean_std(aucs), "n_train": len(train["label"]), "n_test": len(test["label"]),
            "positive_rate": float(test["label"].mean()), "per_seed_auc": aucs}


# -----------------------------------------------------------------------------
# Figure 2 (HTCL): cosine similarity of anchor-positive (favoured) and
# anchor-negative (recommended, not favoured) pairs. A representation that
# models user preference shifts the positive histogram to the right.


def pair_cosines(emb, anchors, songs):
    """emb (N, D); anchors, songs: (P,) rows -> (P,) cosine of each pair."""
    e = F.normalize(as_float_tensor(emb), dim=1)
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


# -----------------------------------------------------------------------------
# Table 2 in one go: every evaluation that the given files allow.


def report(sources, catalog, favourites=None, impressions=None, pairs=None, out_dir="report", kind="audio",
           mode=None, cache=None, probe_seeds=(0, 1, 2, 3, 4), ranking_seeds=(0,), ranking_epochs=2,
           n_triggers=30, workers=None, reuse=True, labels=("genre", "language")):
    """sources: {name: embedding spec}; favourites / impressions / pairs: paths or None; labels: the
    columns probed. Writes out_dir/table2.md (ACC genre, ACC language, HR@100, CTR AUC, CVR AUC, as in
    HTCL Table 2; "-" where a protocol is skipped, with the reason as a footnote; no ranking with
    ranking_seeds=()), out_dir/figure2.png (from pairs, else impressions), its cosines in figure2.npz
    ({model}/pos, {model}/neg: for pooling runs, see table2_over_seeds), out_dir/table2.json (the same
    numbers: {model: {acc_genre: [mean, std], hr@100: ..., ...}}). Prints a line per protocol and
    model, and each protocol's total time. The probes and DIN models train on `workers` threads
    (default: the available cores, at most 8). With reuse, a
    probe or DIN result already in out_dir/results.json for the same embedding matrix (byte for
    byte) and the same labels, split, impressions and settings is taken from there: adding a
    model to a report trains only its own jobs (demo.sh evaluates stage 1 while stage 2 trains).
    Returns the Markdown table with its footnotes."""
    os.makedirs(out_dir, exist_ok=True)
    inputs = _report_inputs(catalog, favourites, impressions, pairs, n_triggers, ranking_seeds, labels)
    settings = dict(probe_seeds=probe_seeds, ranking_seeds=ranking_seeds, ranking_epochs=ranking_epochs)
    times = []  # (protocol, seconds), appended from several threads (list.append is atomic)

    def timed_call(name, protocol, fn, *args, **kw):
        t0 = time.time()
        out = fn(*args, **kw)
        dt = time.time() - t0
        times.append((protocol, dt))
        print(f"report: {name}: {protocol} {dt:.1f} s", flush=True)
        return out

    results, cosines, embs = {name: {} for name in sources}, {}, {}
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
    if reuse and os.path.exists(saved_path):  # checked before any training: a bad file stops the report now
        saved = read_json(saved_path, "the report's saved results, {digest: result} (--no-reuse ignores it)")
    digests = _job_digests(inputs, **settings) if reuse else {}  # result key -> what the job reads but embeddings
    keys = {}  # (model, result key) -> digest
    cases, fig_pairs = inputs["cases"], inputs["fig_pairs"]
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        jobs = {}  # future -> (model, result key)
        try:
            for name in order:
                emb = timed_call(name, "embeddings", song_embeddings, sources[name], catalog, kind, mode, cache)
                embs[name] = emb
                emb_digest = _digest(np.asarray(emb, dtype=np.float32)) if reuse else None
                for key, protocol, fn, args, kw in _report_jobs(emb, inputs, **settings):
                    digest = keys[name, key] = _digest(emb_digest, digests[key]) if reuse else None
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
    columns = [f"acc_{c}" for c in labels] + REPORT_COLUMNS
    results = {name: {k: res[k] for k in columns if k in res} for name, res in results.items()}  # not job order
    table = _write_report(out_dir, results, cosines, inputs["skipped"], labels)
    print("\n".join(health_lines({name: embs[name] for name in sources})[0]))  # collapse measures
    _print_times(times)
    return table


def _report_inputs(catalog, favourites, impressions, pairs, n_triggers, ranking_seeds, label_columns):
    """What the report's protocols read -> {"split", "labels", "cases", "imp", "fig_pairs", "skipped"};
    skipped: Table 2 column -> why it shows "-"."""
    split, split_note = probe_split(catalog)
    skipped = {}
    for column in label_columns:
        if column not in catalog.columns:
            skipped[ACC_TITLES.get(column, f"ACC {column}")] = f"{catalog.path} has no '{column}' column"
    if split_note:
        print("report: " + split_note)
    cases = imp = None
    if favourites:
        cases = sample_matching_cases(load_favourites(favourites, catalog), n_triggers)
        if not len(cases[1]):
            skipped["HR@100"] = f"no user of {favourites} has more than {n_triggers} favourites (--triggers)"
    else:
        skipped["HR@100"] = "no --favourites given"
    if impressions:
        imp = read_impressions(impressions, catalog)
    else:
        skipped["CTR AUC"] = skipped["CVR AUC"] = "no --impressions given"
    if impressions and not ranking_seeds:
        skipped["CTR AUC"] = skipped["CVR AUC"] = "DIN not run (--ranking_seeds 0)"
    if pairs:
        fig_pairs = read_labelled_pairs(pairs, catalog)
    elif imp is not None:
        fig_pairs = pairs_from_impressions(imp)
    else:
        fig_pairs = None
        skipped["Fig. 2 AUC"] = "neither --pairs nor --impressions given"
    labels = {c: [catalog.label(r, c) for r in range(len(catalog))] for c in label_columns if c in catalog.columns}
    return {"split": split, "labels": labels, "cases": cases, "imp": imp, "fig_pairs": fig_pairs, "skipped": skipped}


def _report_jobs(emb, inputs, probe_seeds, ranking_seeds, ranking_epochs):
    """One model's probe and DIN jobs -> [(result key, protocol, fn, args, kwargs)]."""
    todo = [(f"acc_{c}", f"probe {c}", run_probe, (emb, labels, inputs["split"]), dict(seeds=probe_seeds))
            for c, labels in inputs["labels"].items()]
    todo += [(f"{t}_auc", f"ranking {t}", run_ranking, (emb, inputs["imp"], t),
              dict(seeds=ranking_seeds, epochs=ranking_epochs))
             for t in ("ctr", "cvr") if inputs["imp"] is not None and ranking_seeds]
    return todo


def _job_digests(inputs, probe_seeds, ranking_seeds, ranking_epochs):
    """Result key -> digest of what its job reads besides the embeddings (labels, split, log, settings)."""
    digests = {f"acc_{c}": _digest(labels, inputs["split"], list(probe_seeds), PROBE_LR, PROBE_MIN_STEPS)
               for c, labels in inputs["labels"].items()}
    imp = inputs["imp"]
    if imp is not None and ranking_seeds:
        imp_digest = _digest(*(imp[k] for k in sorted(imp)))  # once: the log may be large
        digests.update({f"{t}_auc": _digest(imp_digest, t, list(ranking_seeds), ranking_epochs)
                        for t in ("ctr", "cvr")})
    return digests


REPORT_HEADER = ["HR@100", "CTR AUC", "CVR AUC", "Fig. 2 AUC"]  # after Model and an ACC column per label
REPORT_COLUMNS = ["hr@100", "ctr_auc", "cvr_auc", "fig2_auc"]


ACC_TITLES = {"genre": "ACC genre", "language": "ACC lang"}  # Table 2's names; another column: ACC COLUMN


def _write_report(out_dir, results, cosines, skipped, labels=("genre", "language")):
    """table2.md (the table, with a footnote per "-"), table2.json and figure2.npz -> the table's text."""
    rows = []
    for name, res in results.items():
        row = [name]
        row += [plus_minus(res[f"acc_{c}"]) if f"acc_{c}" in res else "-" for c in labels]
        row.append(f"{100 * res['hr@100']:.2f}%" if "hr@100" in res else "-")
        row += [plus_minus(res[f"{t}_auc"]) if f"{t}_auc" in res else "-" for t in ("ctr", "cvr")]
        row.append(f"{res['fig2_auc']:.4f}" if "fig2_auc" in res else "-")
        rows.append(row)
    table = markdown_table(["Model"] + [ACC_TITLES.get(c, f"ACC {c}") for c in labels] + REPORT_HEADER, rows)
    if skipped:
        table += "\n\n" + "\n".join(f"- {column} \"-\": {why}" for column, why in skipped.items())
    with open(os.path.join(out_dir, "table2.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "table2.json"), "w") as f:  # the same numbers, for scripts
        json.dump(results, f, indent=1, default=float)
    if cosines:
        np.savez(os.path.join(out_dir, "figure2.npz"),
                 **{f"{name}/{side}": c for name, pair in cosines.items() for side, c in zip(("pos", "neg"), pair)})
    return table


def _print_times(times):
    seconds = defaultdict(float)  # protocol -> total over models
    for protocol, dt in times:
        seconds[protocol] += dt
    print("report: time per protocol, summed over models (the probes and DIN run side by side): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))


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


# -----------------------------------------------------------------------------
# Table 2 over seeds (sample_data/table2.sh): each seed's report() results -> mean ± std,
# and the paper's qualitative claims about Table 2 as targets, each
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
        return plus_minus((v["mean"], v["std"]))

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


def cmd_embed(args):
    if args.index == "faiss":
        require_faiss()  # missing: say so before embedding, not after
    catalog, cache = load_inputs(args)
    rows = split_rows(catalog, args.split) if args.split != "all" else list(range(len(catalog)))
    kinds = ["audio"] + ["text"] * args.text + ["fused"] * args.fused
    model, tokenizer = load_artifact(args.artifact, embed_shards.device(args.shards), text=kinds != ["audio"])
    mode = args.mode or model.cfg.embed_mode  # an explicit --mode wins over what the artifact was trained for
    embs = embed_shards.embed_songs(args, model, tokenizer, catalog, rows, mode, kinds, cache)  # embed_catalog here
    if embs is None:  # --shards under accelerate launch, every rank but 0 (which merges their parts and writes)
        return {"songs": 0, "kinds": kinds, "out": args.out}
    prov = embedding_provenance(args.artifact, model, mode)  # what search/matching/report/retrieval check
    meta = {"artifact": os.path.abspath(args.artifact), "catalog": os.path.abspath(args.catalog), "mode": mode,
            "split": args.split, "kinds": kinds,
            "chunk_frames": seconds_to_frames(prov["chunk_seconds"]) if prov["chunk_seconds"] else None}
    save_embeddings(args.out, [catalog[r].song_id for r in rows], embs, meta, prov)
    for kind, x in embs.items():  # an index of embeddings written before would now be stale
        search.save_or_drop_index(args.out, kind, x, prov if args.index == "faiss" else None)
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
    catalog, cache = load_inputs(args)
    split, note = probe_split(catalog, args.split_column, args.random_split)
    if note:
        print(note)
    results, rows = {}, []
    args.emb = with_baselines(args.emb) if args.baselines else args.emb
    for name, emb in embeddings_of(args, catalog, cache).items():
        for column in args.label or ["genre", "language"]:
            r = run_probe(emb, catalog_column(catalog, column), split, args.train_split, args.test_split,
                          seeds=range(args.seeds), test_fraction=args.random_split or PROBE_TEST_FRACTION,
                          hidden=args.hidden, epochs=args.epochs, lr=args.lr)
            results[f"{name}/{column}"] = r
            rows.append([name, column, plus_minus(r["acc"]), plus_minus(r["macro_f1"]), f"{r['chance']:.4f}",
                         r["n_classes"], f"{r['n_train']}/{r['n_test']}"])
    print(markdown_table(["emb", "label", "accuracy", "macro-F1", "chance (test majority)", "classes", "train/test"], rows))
    return results


def cmd_matching(args):
    catalog, cache = load_inputs(args)
    triggers, targets, _, stats = sample_matching_cases(load_favourites(args.favourites, catalog), args.triggers,
                                                        args.seed)
    print(f"matching: {stats['eligible']} of {stats['users']} users have > {args.triggers} distinct favourites"
          f" ({stats['duplicates']} repeated favourites counted once); chance HR@{args.list_size} "
          f"~ {matching_chance(len(catalog), args.triggers, args.per_trigger, args.list_size):.4f}")
    if stats["eligible"] == 0:
        raise SystemExit(f"{args.favourites}: no user has more than {args.triggers} favourites; lower --triggers")
    if args.index == "faiss":
        require_faiss()
    results, rows = {}, []
    specs = dict(zip(row_names(args.emb), args.emb))
    for name, emb in embeddings_of(args, catalog, cache).items():
        t0 = time.time()
        index = catalog_index(specs[name], catalog, emb, args.nprobe) if args.index == "faiss" else None
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
    catalog, cache = load_inputs(args)
    imp = read_impressions(args.impressions, catalog)
    results, rows = {}, []
    for name, emb in embeddings_of(args, catalog, cache).items():
        for task in args.task:
            r = run_ranking(emb, imp, task, args.train_days, args.test_day, args.behaviour, args.max_len,
                            seeds=range(args.seeds), epochs=args.epochs, lr=args.lr, freeze_items=args.freeze_items)
            results[f"{name}/{task}"] = r
            rows.append([name, task.upper(), plus_minus(r["auc"]), r["n_train"], r["n_test"],
                         f"{r['positive_rate']:.3f}"])
    print(markdown_table(["emb", "task", "AUC (day test)", "train", "test", "positive rate"], rows))
    return results


def cmd_distance(args):
    catalog, cache = load_inputs(args)
    if args.pairs:
        anchors, songs, positive = read_labelled_pairs(args.pairs, catalog)
    elif args.impressions:
        anchors, songs, positive = pairs_from_impressions(read_impressions(args.impressions, catalog))
    else:
        raise SystemExit("distance: give --pairs (anchor,song,label) or --impressions")
    if positive.all() or not positive.any():
        raise SystemExit(f"distance: {positive.sum()} positive and {(~positive).sum()} negative pairs; need both")
    results, rows, cosines = {}, [], {}
    for name, emb in embeddings_of(args, catalog, cache).items():
        cos = pair_cosines(emb, anchors, songs)
        cosines[name] = (cos[positive], cos[~positive])
        results[name] = separation(*cosines[name])
        rows.append([name, f"{results[name]['mean_gap']:+.4f}", f"{results[name]['auc']:.4f}",
                     f"{results[name]['n_pos']}/{results[name]['n_neg']}"])
    print(markdown_table(["emb", "mean(pos) - mean(neg)", "AUC pos vs neg", "pos/neg pairs"], rows))
    plot_histograms(cosines, args.out, args.bins)
    print(f"distance: histograms -> {args.out}")
    return results


def cmd_report(args):
    catalog, cache = load_inputs(args)
    args.emb = with_baselines(args.emb) if args.baselines else args.emb
    sources = dict(zip(row_names(args.emb), args.emb))
    table = report(sources, catalog, args.favourites, args.impressions, args.pairs, args.out, args.kind, args.mode,
                   cache, probe_seeds=range(args.probe_seeds), ranking_seeds=range(args.ranking_seeds),
                   n_triggers=args.triggers, workers=args.workers, reuse=args.reuse,
                   labels=tuple(args.label or ("genre", "language")))
    print(table)
    print(f"report: {args.out}/table2.md" + (f", {args.out}/figure2.png" if args.pairs or args.impressions else ""))
    return {"table": table}


def cmd_table2(args):
    per_seed, cosines, seen = [], [], {}
    for folder in args.reports:
        path = os.path.join(folder, "table2.json")
        if os.path.realpath(folder) in seen:
            raise SystemExit(f"table2: {folder} is given twice (as {seen[os.path.realpath(folder)]} too)")
        seen[os.path.realpath(folder)] = folder
        if not os.path.exists(path):
            raise SystemExit(f"table2: {path} not found (run evaluate.py report --out {folder} first)")
        per_seed.append(read_json(path, "a report's table2.json, {model: {metric: value}}"))
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
        a, dash, b = s.partition("-")
        days = list(range(int(a), int(b) + 1)) if dash else [int(v) for v in s.split(",")]
    except ValueError:
        days = []
    if not days:  # not numbers, or a backwards range (7-1)
        raise argparse.ArgumentTypeError(f"days as a range 1-7 or a list 1,2,3; got {s!r}")
    return days


class _Parser(argparse.ArgumentParser):
    """Every sub-command's parser: -h shows each option's default, abbreviations are refused.
    Flags are spelled with underscores (--batch_size); the dashed spellings of before (--batch-size)
    stay accepted, in this one place: a `--foo-bar` this parser does not know but whose `--foo_bar`
    it does is read as `--foo_bar`. --help shows only the underscore spellings."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._underscored(a) for a in args], namespace)

    def _underscored(self, arg):
        if not isinstance(arg, str) or not arg.startswith("--") or arg in self._option_string_actions:
            return arg
        flag, eq, value = arg.partition("=")
        renamed = "--" + flag[2:].replace("-", "_")
        return renamed + eq + value if renamed in self._option_string_actions else arg


def build_parser():
    p = _Parser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_embed_parser(sub)
    search.add_parser(sub)
    _add_probe_parser(sub)
    _add_matching_parsers(sub)
    _add_ranking_parser(sub)
    _add_distance_parser(sub)
    crossmusim.add_parser(sub)
    artist_graph.add_parser(sub)
    _add_report_parser(sub)
    _add_table2_parser(sub)
    return p


def _add_embed_parser(sub):
    q = add_command(sub, "embed", cmd_embed, "write a catalog's song embeddings (ids.txt + KIND.npy)", source=False)
    q.add_argument("--artifact", required=True, help="folder written by pretrain.py / finetune.py")
    q.add_argument("--catalog", required=True, help="catalog CSV/JSONL (data.py format)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--mode", default=None, choices=["full", "chunked"], help="full: whole song (120 s) at once "
                   "(HTCL); chunked: mean of 10 s windows (CrossMuSim); default: the artifact's embed_mode")
    q.add_argument("--text", action="store_true", help="also write text.npy (text tower)")
    q.add_argument("--fused", action="store_true", help="also write fused.npy (fusion MLP, stage 2)")
    q.add_argument("--split", default="all", choices=["all", "train", "val", "test"], help="which catalog rows")
    q.add_argument("--cache", help="log-mel cache folder (data.py prepare); without it audio is decoded here")
    q.add_argument("--shards", help="log-mel shards (data.py prepare --shards); accelerate launch: each rank its own")
    q.add_argument("--batch_size", type=positive_int, default=16, help="songs per forward pass")
    q.add_argument("--index", default="none", choices=["none", "faiss"],
                   help="faiss: also save a FAISS index of each kind (KIND.faiss) for `search`/`matching "
                        "--index faiss`; exact below 1M songs, IVF from 1M on (pip install faiss-cpu)")


def _add_probe_parser(sub):
    q = add_command(sub, "probe", cmd_probe,
                    "semantic tasks: MLP probe accuracy / macro-F1 on frozen embeddings (HTCL)")
    q.add_argument("--label", action="append", default=None, help="label column(s); none given: genre, language")
    q.add_argument("--split_column", default="split",
                   help="column with train/test; a catalog without it gets a seeded random split (as report)")
    q.add_argument("--train_split", default="train", help="value of the split column that trains the probe")
    q.add_argument("--test_split", default="test", help="value of the split column that scores it")
    q.add_argument("--random_split", type=fraction, default=None, metavar="FRACTION",
                   help="ignore the split column: each seed holds out this random fraction")
    q.add_argument("--seeds", type=positive_int, default=5, help="runs; mean ± std is reported")
    q.add_argument("--hidden", type=non_negative_int, default=512, help="hidden width; 0 = linear probe")
    q.add_argument("--epochs", type=positive_int, default=100,
                   help=f"training epochs (at least {PROBE_MIN_STEPS} steps on small sets)")
    q.add_argument("--lr", type=positive_float, default=PROBE_LR, help="AdamW learning rate")
    q.add_argument("--baselines", action="store_true", help=BASELINES_HELP)


def _add_matching_parsers(sub):
    q = add_command(sub, "matching", cmd_matching, "next-item HR@K from a favourites log (HTCL matching)")
    q.add_argument("--favourites", required=True, help="CSV user_id,song_id,timestamp")
    q.add_argument("--triggers", type=positive_int, default=30, help="favourites before the target, the triggers (paper: 30)")
    q.add_argument("--per_trigger", type=positive_int, default=10, help="neighbours retrieved per trigger (paper: 10)")
    q.add_argument("--list_size", type=positive_int, default=100, help="K of HR@K (paper: 100)")
    q.add_argument("--merge", default="best", choices=["best", "round-robin"],
                   help="how candidates become one list (paper silent; our reading: best cosine)")
    q.add_argument("--seed", type=non_negative_int, default=0, help="draws each user's target")
    q.add_argument("--index", default="exact", choices=["exact", "faiss"],
                   help="neighbour search: exact cosine in torch, or the FAISS index `embed --index faiss` saved "
                        "(built in memory if absent)")
    q.add_argument("--nprobe", type=positive_int, default=search.FAISS_NPROBE, help="cells an approximate FAISS index scans")

    q = add_command(sub, "matching-benchmark", cmd_matching_benchmark,
                    "time matching on random vectors (default 100k songs x 10k users)", source=False)
    q.add_argument("--songs", type=positive_int, default=100_000, help="random songs")
    q.add_argument("--users", type=positive_int, default=10_000, help="random users, 31 favourites each")
    q.add_argument("--dim", type=positive_int, default=100, help="embedding width")


def _add_ranking_parser(sub):
    q = add_command(sub, "ranking", cmd_ranking,
                    "DIN CTR / CVR AUC with item embeddings from the representations (HTCL)")
    q.add_argument("--impressions", required=True, help="CSV user_id,song_id,day,clicked,favoured")
    q.add_argument("--task", nargs="+", default=["ctr", "cvr"], choices=["ctr", "cvr"], help="which AUCs")
    q.add_argument("--train_days", type=_days, default=list(range(1, 8)), help="days that train DIN: 1-7 or 1,2,3")
    q.add_argument("--test_day", type=int, default=8, help="day whose impressions are scored")
    q.add_argument("--behaviour", default="clicked", choices=["clicked", "favoured"],
                   help="what forms the user's behaviour sequence (songs on earlier days)")
    q.add_argument("--max_len", type=positive_int, default=50, help="most recent behaviours kept")
    q.add_argument("--epochs", type=positive_int, default=2, help="DIN training epochs")
    q.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    q.add_argument("--seeds", type=positive_int, default=1, help="runs; mean ± std is reported")
    q.add_argument("--freeze_items", action="store_true", help="keep item embeddings fixed (default: fine-tuned)")


def _add_distance_parser(sub):
    q = add_command(sub, "distance", cmd_distance, "Figure 2: cosine histograms of positive vs negative pairs")
    q.add_argument("--pairs", help="CSV anchor,song,label (positive/negative or 1/0)")
    q.add_argument("--impressions", help="derive pairs from an impressions log instead (see pairs_from_impressions)")
    q.add_argument("--out", default="figure2.png", help="PNG path")
    q.add_argument("--bins", type=positive_int, default=50, help="histogram bins over [-1, 1]")


def _add_report_parser(sub):
    q = add_command(sub, "report", cmd_report,
                    "Table 2 (ACC genre/lang, HR@100, CTR/CVR AUC) and Figure 2 for several models")
    q.add_argument("--favourites", help="CSV user_id,song_id,timestamp: HR@100 (without it: '-')")
    q.add_argument("--impressions", help="CSV user_id,song_id,day,clicked,favoured: CTR/CVR AUC, and Figure 2 "
                                         "pairs when --pairs is not given (without both: '-')")
    q.add_argument("--pairs", help="Figure 2 pairs: CSV anchor,song,label, or stage-2 trigger_song_id,rec_song_id")
    q.add_argument("--triggers", type=positive_int, default=30, help="matching: favourites before the target (paper: 30)")
    q.add_argument("--label", action="append", help="catalog column(s) to probe (default: genre, language, as Table 2)")
    q.add_argument("--out", default="report", help="output folder")
    q.add_argument("--probe_seeds", type=positive_int, default=5, help="probe runs per embedding (mean ± std)")
    q.add_argument("--ranking_seeds", type=non_negative_int, default=1, help="DIN runs per embedding; 0 skips the ranking columns")
    q.add_argument("--workers", type=non_negative_int, default=0, help="threads that train the probes and DIN models side "
                   "by side; results do not depend on it. 0: the available cores, at most 8")
    q.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="take a probe or DIN result from OUT/results.json when its embeddings and inputs match "
                        "exactly; --no-reuse retrains every one")
    q.add_argument("--baselines", action="store_true", help=BASELINES_HELP)


def _add_table2_parser(sub):
    q = sub.add_parser("table2", allow_abbrev=False, help="Table 2 over seeds: mean ± std of per-seed reports, "
                       "and the paper's qualitative claims as met/missed targets (sample_data/table2.sh)")
    q.set_defaults(fn=cmd_table2, json=None)
    q.add_argument("reports", nargs="+", help="report folders (evaluate.py report --out), one per seed; their "
                   "rows named " + ", ".join(key for _, key in TABLE2_ROWS))
    q.add_argument("--out", required=True, help="folder for table2.md, table2.json and figure2.png")


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
