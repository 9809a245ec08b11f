"""Tests of finetune.py's pairs: a pair touching a val or test song never reaches training.

    python -m pytest -q tests/test_finetune.py
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from own_songs import TINY_FLAGS, split_of, write_world  # noqa: E402

import data  # noqa: E402
import finetune  # noqa: E402
import model as htcl  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("world")
    catalog, cache = write_world(str(folder))
    torch.manual_seed(0)
    cfg = htcl.HTCLConfig(audio=htcl.AudioConfig(conv_channels=16, hidden=16, layers=1, heads=2, ffn=32,
                                                 pos_conv_kernel=5, pos_conv_groups=2),
                          text_model=TINY_FLAGS[1], text_pretrained=False, proj_dims=(12, 8), fusion_dims=(8, 8))
    htcl.save_artifact(htcl.HTCL(cfg), AutoTokenizer.from_pretrained(TINY_FLAGS[1]), str(folder / "stage1"))
    return folder, catalog, cache


def _finetune_sets(folder, catalog, cache, pairs, monkeypatch):
    """finetune.main up to the loop: -> (train pair set, val pair set) it hands to train()."""
    got = {}
    monkeypatch.setattr(finetune, "train", lambda cfg, model, tok, loss, train_set, val_set, songs, stage:
                        got.update(train=train_set, val=val_set))
    finetune.main(["--init_from", str(folder / "stage1"), "--catalog", catalog, "--cache", cache, "--pairs", pairs,
                   "--out_dir", str(folder / "ft"), "--num_workers", "0"])
    return got["train"], got["val"]


def test_pairs_touching_a_val_or_test_song_are_dropped_and_counted(world, tmp_path, monkeypatch, capsys):
    folder, catalog, cache = world
    train_songs = [i for i in range(20) if split_of(i) == "train"]
    pairs = [(a, b) for a in train_songs for b in train_songs if a < b]  # 66 clean pairs
    leaks = [(0, 2), (3, 1), (5, 6), (10, 11), (15, 16)]  # s0, s5, s10, s15 test; s1, s6, s11, s16 val
    path = tmp_path / "pairs.csv"
    path.write_text("trigger_song_id,rec_song_id\n" + "".join(f"s{a},s{b}\n" for a, b in pairs + leaks))
    train_set, val_set = _finetune_sets(folder, catalog, cache, str(path), monkeypatch)
    out = capsys.readouterr().out
    assert f"dropped {len(leaks)} of {len(pairs) + len(leaks)} pairs touching a song outside the train split" in out
    c = data.load_catalog(catalog)
    held_out = set(data.split_rows(c, "val")) | set(data.split_rows(c, "test"))
    used = [p for s in (train_set, val_set) for p in s.pairs]
    assert len(used) == len(pairs) and not any(t in held_out or r in held_out for t, r in used)


def test_pairs_that_all_touch_held_out_songs_are_refused_naming_the_file(world, tmp_path, monkeypatch):
    folder, catalog, cache = world
    path = tmp_path / "leaky.csv"
    path.write_text("trigger_song_id,rec_song_id\ns0,s2\ns3,s1\n")
    with pytest.raises(data.CatalogError, match="leaky.csv: every one of its 2 pairs touches a val or test song"):
        _finetune_sets(folder, catalog, cache, str(path), monkeypatch)
