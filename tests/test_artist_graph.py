"""Tests of evals/artist_graph.py's inputs and flags: a split value it does not know, a self-loop
and a bad flag value are each said in one line, never silently dropped. Run from the repo root:

    python -m pytest -q tests/test_artist_graph.py
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate as ev  # noqa: E402
from evals import artist_graph  # noqa: E402


def _graph(tmp_path, splits, edges):
    (tmp_path / "split.csv").write_text("artist_id,split\n" + "".join(f"a{i},{s}\n" for i, s in enumerate(splits)))
    (tmp_path / "edges.csv").write_text("artist_a,artist_b\n" + "".join(f"a{a},a{b}\n" for a, b in edges))
    return str(tmp_path / "edges.csv"), str(tmp_path / "split.csv")


def test_a_split_value_other_than_train_val_test_is_refused_naming_file_and_line(tmp_path):
    """Bug checked: 'Test' left that artist in no graph, unscored, and moved NDCG by 0.03."""
    edges, split = _graph(tmp_path, ["train", "train", "Test", "test"], [(0, 1), (2, 3)])
    with pytest.raises(ValueError, match=r"split.csv: line 4, column 'split': 'Test' for artist 'a2'; expected one "
                                         r"of train, val, test"):
        artist_graph.read_artist_graph(edges, split)


def test_self_loops_are_dropped_and_counted_aloud(tmp_path, capsys):
    edges, split = _graph(tmp_path, ["train", "train", "test"], [(0, 1), (1, 1), (2, 2), (0, 2)])
    artists, _, e = artist_graph.read_artist_graph(edges, split)
    assert e.tolist() == [[0, 1], [0, 2]]
    assert "dropped 2 self-loops (an artist linked to itself), lines 3, 4" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--k", "-3"), ("--k", "0"), ("--seeds", "0"), ("--epochs", "-1"),
                                         ("--lr", "0"), ("--layers", "-1"), ("--random_dim", "0")])
def test_flag_values_of_the_wrong_sign_are_usage_errors(tmp_path, capsys, flag, value):
    """Bug checked: --k -3 was torch's 'selected index k out of range' after all the training."""
    edges, split = _graph(tmp_path, ["train", "train", "test", "test"], [(0, 1), (2, 3)])
    with pytest.raises(SystemExit) as e:
        ev.main(["artist-graph", "--edges", edges, "--artist_split", split, "--features", "random", flag, value])
    assert e.value.code == 2 and f"{flag}: expected a" in capsys.readouterr().err
