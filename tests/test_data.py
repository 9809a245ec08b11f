"""Tests of data.py's command line values: a number of the wrong sign or size is a usage error
before any file is read or written. Run from the repo root:

    python -m pytest -q tests/test_data.py
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402

CATALOG = os.path.join(ROOT, "sample_data", "catalog.csv")
FAVOURITES = os.path.join(ROOT, "sample_data", "favourites.csv")


@pytest.mark.parametrize("argv, flag", [
    (["prepare", "--num_workers", "-1"], "--num_workers"), (["prepare", "--max_bad", "-1"], "--max_bad"),
    (["prepare", "--max_bad", "2"], "--max_bad"),
    (["mine-pairs", "--window", "0"], "--window"), (["mine-pairs", "--window", "1"], "--window"),
    (["mine-pairs", "--max_pairs_per_user", "-2"], "--max_pairs_per_user"), (["mine-pairs", "--seed", "-1"], "--seed")])
def test_numbers_of_the_wrong_sign_or_size_are_usage_errors_before_any_work(tmp_path, capsys, argv, flag):
    """Bugs checked: prepare --num_workers -1 wrote part of a cache, then died in DataLoader;
    --window 0 was an AssertionError, --max_pairs_per_user -2 numpy's 'negative dimensions'."""
    io = (["--catalog", CATALOG, "--cache", str(tmp_path / "cache")] if argv[0] == "prepare" else
          ["--favourites", FAVOURITES, "--catalog", CATALOG, "--out", str(tmp_path / "p.csv")])
    with pytest.raises(SystemExit) as e:
        data.main([argv[0], *io, *argv[1:]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and ": expected " in err, err
    assert os.listdir(tmp_path) == []
