"""Tests of evaluate.py's probe table: its chance column.

    python -m pytest -q tests/test_evaluate.py
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as ev  # noqa: E402


def test_probe_chance_is_the_test_sets_majority_share_not_the_training_sets():
    rng = np.random.default_rng(0)
    # train: 6 a, 2 b (majority share 0.75); test: 2 b, 1 a (majority share 2/3)
    labels = ["a"] * 6 + ["b"] * 2 + ["b", "b", "a"]
    split = ["train"] * 8 + ["test"] * 3
    r = ev.run_probe(rng.standard_normal((11, 4)), labels, split, seeds=(0,), epochs=2)
    assert r["chance"] == pytest.approx(2 / 3)
    # Without a split each seed draws its own test set: the mean of their majority shares.
    n = 200
    labels = np.where(rng.random(n) < 0.7, "x", "y").tolist()
    r = ev.run_probe(rng.standard_normal((n, 4)), labels, None, seeds=(0, 1), epochs=2)
    shares = []
    for seed in (0, 1):
        test = np.random.default_rng(seed).random(n) < 0.2  # run_probe's seeded draw
        t = np.asarray(labels)[test]
        shares.append(max((t == "x").mean(), (t == "y").mean()))
    assert r["chance"] == pytest.approx(np.mean(shares))


def test_probe_table_prints_the_chance_column(tmp_path, capsys):
    rows = ["song_id,audio,title,artists,lyrics,genre,split"]
    rows += [f"s{i},a{i}.wav,t{i},,,{'a' if i < 6 else 'b'},train" for i in range(8)]
    rows += ["s8,a8.wav,t8,,,b,test", "s9,a9.wav,t9,,,b,test", "s10,a10.wav,t10,,,a,test"]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    np.save(tmp_path / "e.npy", np.random.default_rng(1).standard_normal((11, 3)).astype(np.float32))
    (tmp_path / "e.ids.txt").write_text("".join(f"s{i}\n" for i in range(11)))
    ev.main(["probe", "--catalog", str(tmp_path / "c.csv"), "--emb", str(tmp_path / "e.npy"), "--label", "genre",
             "--seeds", "1", "--epochs", "2"])
    out = capsys.readouterr().out
    header, _, row = [line for line in out.splitlines() if line.startswith("|")]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["chance (test majority)"] == "0.6667"
