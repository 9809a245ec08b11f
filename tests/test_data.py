"""Tests of data.py's stage-2 pairs without a user log (pairs-from-column) and the held-out drop.

    python -m pytest -q tests/test_data.py
"""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402


def _catalog(tmp_path):
    # album A: s0 s1 s2 (s2 is test); album B: s3 s4; s5 alone; s6 no album; album C: s7 (val) s8
    rows = [("s0", "A", "train"), ("s1", "A", "train"), ("s2", "A", "test"), ("s3", "B", "train"),
            ("s4", "B", "train"), ("s5", "D", "train"), ("s6", "", "train"), ("s7", "C", "val"), ("s8", "C", "train")]
    path = tmp_path / "c.csv"
    path.write_text("song_id,audio,title,artists,lyrics,album,split\n"
                    + "".join(f"{i},{i}.wav,t {i},,,{a},{sp}\n" for i, a, sp in rows))
    return str(path)


def test_column_pairs_are_each_pair_of_a_shared_value_once_within_the_allowed_songs(tmp_path):
    c = data.load_catalog(_catalog(tmp_path))
    unordered = lambda pairs: sorted(tuple(sorted(p)) for p in pairs)  # noqa: E731
    # by hand: A -> (0,1) (0,2) (1,2); B -> (3,4); C -> (7,8); D and the empty album: none
    assert unordered(data.column_pairs(c, "album")) == [(0, 1), (0, 2), (1, 2), (3, 4), (7, 8)]
    train = data.split_rows(c, "train")
    assert unordered(data.column_pairs(c, "album", train)) == [(0, 1), (3, 4)]
    assert len(data.column_pairs(c, "album", max_pairs_per_group=1)) == 3  # one of each group's pairs
    with pytest.raises(data.CatalogError, match="no column 'work_id'"):
        data.column_pairs(c, "work_id")


def test_cli_pairs_from_column_writes_train_pairs_that_finetune_keeps_all_of(tmp_path):
    path = _catalog(tmp_path)
    out = tmp_path / "pairs.csv"
    p = subprocess.run([sys.executable, "data.py", "pairs-from-column", "--catalog", path, "--column", "album",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "pairs-from-column: 2 pairs" in p.stdout
    with open(out) as f:
        got = sorted(tuple(sorted((r["trigger_song_id"], r["rec_song_id"]))) for r in csv.DictReader(f))
    assert got == [("s0", "s1"), ("s3", "s4")]
    c = data.load_catalog(path)
    kept, dropped = data.drop_held_out_pairs(data.load_pairs(str(out), c), c)
    assert dropped == 0 and len(kept) == 2
    # the whole catalog's pairs: the three that touch s2 (test) or s7 (val) are the ones dropped
    kept, dropped = data.drop_held_out_pairs(data.column_pairs(c, "album"), c)
    assert dropped == 3 and sorted(tuple(sorted(p)) for p in kept) == [(0, 1), (3, 4)]


CATALOG = os.path.join(ROOT, "sample_data", "catalog.csv")
FAVOURITES = os.path.join(ROOT, "sample_data", "favourites.csv")


@pytest.mark.parametrize("argv, flag", [
    (["prepare", "--num_workers", "-1"], "--num_workers"), (["prepare", "--max_bad", "-1"], "--max_bad"),
    (["prepare", "--max_bad", "2"], "--max_bad"),
    (["mine-pairs", "--window", "0"], "--window"), (["mine-pairs", "--window", "1"], "--window"),
    (["mine-pairs", "--max_pairs_per_user", "-2"], "--max_pairs_per_user"), (["mine-pairs", "--seed", "-1"], "--seed"),
    (["pairs-from-column", "--max_pairs_per_group", "0"], "--max_pairs_per_group")])
def test_numbers_of_the_wrong_sign_or_size_are_usage_errors_before_any_work(tmp_path, capsys, argv, flag):
    """Bugs checked: prepare --num_workers -1 wrote part of a cache, then died in DataLoader;
    --window 0 was an AssertionError, --max_pairs_per_user -2 numpy's 'negative dimensions'."""
    io = {"prepare": ["--catalog", CATALOG, "--cache", str(tmp_path / "cache")],
          "mine-pairs": ["--favourites", FAVOURITES, "--catalog", CATALOG, "--out", str(tmp_path / "p.csv")],
          "pairs-from-column": ["--catalog", CATALOG, "--column", "artist_id", "--out", str(tmp_path / "p.csv")]}[argv[0]]
    with pytest.raises(SystemExit) as e:
        data.main([argv[0], *io, *argv[1:]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and ": expected " in err, err
    assert os.listdir(tmp_path) == []
