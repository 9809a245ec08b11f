"""Tests of evals/crossmusim.py, the CrossMuSim retrieval protocol: music-to-music mAP@10,
text-to-music R@K, same-artist statistics and the exclude-same control, each against a brute force,
and tag queries through an artifact's text tower.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_crossmusim.py
"""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate as ev
from evals import crossmusim
import model as htcl

from tests.helpers import _unit


def test_music_to_music_map_matches_brute_force():
    rng = np.random.default_rng(4)
    tags = rng.choice(["rock", "jazz", "folk", ""], 90)
    emb = rng.standard_normal((90, 6)) + 1.5 * np.eye(6)[np.searchsorted(["", "folk", "jazz", "rock"], tags)]
    sims = _unit(emb) @ _unit(emb).T
    aps = []
    for q in range(90):
        if tags[q] == "":
            continue
        n_rel = int(((tags == tags[q]).sum()) - 1)
        if n_rel == 0:
            continue
        order = [j for j in np.argsort(-sims[q], kind="stable") if j != q][:10]
        hits, total = 0, 0.0
        for i, j in enumerate(order):
            if tags[j] == tags[q]:
                hits += 1
                total += hits / (i + 1)
        aps.append(total / min(10, n_rel))
    got, n = crossmusim.music_to_music_map(emb, tags, k=10, batch_size=7)
    assert n == len(aps) and got == pytest.approx(np.mean(aps))


def test_text_to_music_hand_worked():
    songs = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=float)
    tags = ["rock", "jazz", "jazz", "rock"]
    queries = np.array([[1, 0], [0, 1], [1, 1]], dtype=float)
    # "rock" ranks 0,1,3,2: hit at 1 and 3 -> AP@10 = (1 + 2/3) / 2; R@1 yes
    # "jazz" ranks 2,3,1,0: hit at 1 and 3 -> same AP; R@1 yes
    # "opera" has no song: left out
    out = crossmusim.text_to_music(queries, ["rock", "jazz", "opera"], songs, tags, ks=(1, 2))
    assert out["queries"] == 2
    assert out["R@1"] == 1.0 and out["R@2"] == 1.0
    assert out["mAP@10"] == pytest.approx((1 + 2 / 3) / 2)


def test_same_artist_stats_match_loop():
    rng = np.random.default_rng(5)
    artists = rng.choice(["x", "y", "z", "w", ""], 50)
    emb = rng.standard_normal((50, 4))
    sims = _unit(emb) @ _unit(emb).T
    counts = []
    for q in range(50):
        if artists[q] == "":
            continue
        order = [j for j in np.argsort(-sims[q], kind="stable") if j != q][:5]
        counts.append(sum(artists[j] == artists[q] for j in order))
    counts = np.array(counts)
    out = crossmusim.same_artist_stats(emb, artists, k=5)
    assert out["share_with_same_artist"] == pytest.approx((counts > 0).mean())
    assert out["mean_same_artist"] == pytest.approx(counts.mean())
    assert out["mean_same_artist_given_any"] == pytest.approx(counts[counts > 0].mean())


# Checked by making its bug by hand: T2M query text without --template.
def test_retrieval_queries_tag_text_through_the_artifacts_text_tower(tiny_world, tmp_path):
    """T2M on 8 songs, 4 "rock" and 4 "jazz": the ranks, so R@1 and mAP, depend on the artifact's
    embeddings. Checked against a brute force: each song's audio and each query text
    ("genre: rock") through the artifact one at a time, the ranking by a Python sort."""
    from data import load_catalog, song_mel
    d = tiny_world
    rng = np.random.default_rng(5)
    rows = []
    for i in range(8):
        t = np.arange(int((1.0 + 0.25 * i) * 16000)) / 16000
        x = 0.3 * np.sin(2 * np.pi * (150 + 90 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(tmp_path / f"s{i}.wav", x.astype(np.float32), 16000)
        rows.append(f"s{i},s{i}.wav,song {i},artist {i},la,{('rock', 'jazz')[i % 2]},en,train\n")
    (tmp_path / "catalog.csv").write_text("song_id,audio,title,artists,lyrics,genre,language,split\n" + "".join(rows))
    # The fixture's artifact with mean text pooling: a random BERT's [CLS] barely depends on the
    # text, which would let a wrong query text ("rock" for "genre: rock") rank the songs the same.
    shutil.copytree(d / "artifact", tmp_path / "artifact")
    config = json.loads((tmp_path / "artifact" / "config.json").read_text())
    (tmp_path / "artifact" / "config.json").write_text(json.dumps({**config, "text_pooling": "mean"}))
    out = ev.main(["retrieval", "--catalog", str(tmp_path / "catalog.csv"), "--emb", str(tmp_path / "artifact"),
                   "--tag", "genre", "--k", "10", "--template", "{column}: {value}"])["artifact/genre/t2m"]

    model, tok = htcl.load_artifact(tmp_path / "artifact")
    catalog = load_catalog(tmp_path / "catalog.csv")
    tags = [catalog.label(r, "genre") for r in range(8)]
    with torch.no_grad():
        songs = [model.encode_audio(song_mel(catalog[r].audio)[None])[0] for r in range(8)]
        r1, r5, aps = [], [], []
        for value in ("jazz", "rock"):
            q = model.encode_text(tok([f"genre: {value}"], return_tensors="pt"))[0]
            ranked = sorted(range(8), key=lambda r: -float(q @ songs[r]))
            rel = [tags[r] == value for r in ranked]
            r1.append(rel[0])
            r5.append(any(rel[:5]))
            hits = np.cumsum(rel)
            aps.append(sum(hits[i] / (i + 1) for i in range(8) if rel[i]) / 4)  # 4 relevant songs, all within k
    assert out["queries"] == 2
    assert out["R@1"] == np.mean(r1) and out["R@5"] == np.mean(r5)
    assert out["mAP@10"] == pytest.approx(np.mean(aps), abs=1e-6), (out, aps)


def test_exclude_same_drops_the_querys_group_from_positives_and_candidates_like_brute_force():
    rng = np.random.default_rng(7)
    n = 60
    tags = rng.choice(["rock", "jazz", "folk", ""], n)
    artists = rng.choice(["p", "q", "r", "s", "t", ""], n)
    emb = rng.standard_normal((n, 5))
    sims = _unit(emb) @ _unit(emb).T
    k = 8
    aps, counts = [], []
    for q in range(n):
        allowed = [j for j in range(n) if j != q and (artists[q] == "" or artists[j] != artists[q])]
        order = sorted(allowed, key=lambda j: -sims[q, j])[:k]
        if artists[q] != "":
            counts.append(sum(artists[j] == artists[q] for j in order))
        if tags[q] == "":
            continue
        n_rel = sum(tags[j] == tags[q] for j in allowed)
        if n_rel == 0:
            continue
        hits, total = 0, 0.0
        for i, j in enumerate(order):
            if tags[j] == tags[q]:
                hits += 1
                total += hits / (i + 1)
        aps.append(total / min(k, n_rel))
    got, nq = crossmusim.music_to_music_map(emb, tags, k=k, batch_size=7, exclude_same=artists)
    assert nq == len(aps) and got == pytest.approx(np.mean(aps))
    plain, _ = crossmusim.music_to_music_map(emb, tags, k=k)
    assert plain != pytest.approx(got)  # the control changes the score on this case
    sa = crossmusim.same_artist_stats(emb, artists, k=k, exclude_same=artists)
    assert sa["share_with_same_artist"] == 0 and sum(counts) == 0
    # hand-made: a (artist x) has its twin b (also x) closest and c (artist y) next, both rock
    e = np.array([[1, 0], [0.99, 0.1], [0.9, 0.4], [0, 1]])
    t, a = ["rock", "rock", "rock", "jazz"], ["x", "x", "y", "z"]
    assert crossmusim.music_to_music_map(e, t, k=2)[0] == pytest.approx(1.0)
    # with x excluded: query a's only positive is c (rank 1): AP 1; b likewise; c's positives a, b: AP 1
    # and d (jazz) has no positive: not a query
    assert crossmusim.music_to_music_map(e, t, k=2, exclude_same=a) == (pytest.approx(1.0), 3)
    e2 = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.3, 0.95]])  # now c sits far from a and b; d is closer to them
    t2, a2 = ["rock", "rock", "jazz", "rock"], ["x", "x", "y", "z"]
    # query a, candidates c, d (b excluded): d (rock) ranks first: AP 1. Query d: candidates a, b, c, with
    # c first (jazz), then b, a: hits at ranks 2 and 3 -> (1/2 + 2/3) / 2
    res = crossmusim.music_to_music_map(e2, t2, k=3, exclude_same=a2)
    assert res[1] == 3 and res[0] == pytest.approx((1 + 1 + (1 / 2 + 2 / 3) / 2) / 3)
