"""Tests of pretrain.py's start: a catalog it cannot validate on stops it before any training.
Run from the repo root:

    python -m pytest -q tests/test_pretrain.py
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pretrain  # noqa: E402

TINY_BERT = os.path.join(ROOT, "sample_data", "tiny-bert")


@pytest.mark.parametrize("splits, missing", [(["train", "test", "train"], "val"), (["val", "test", "Train"], "train")])
def test_a_split_column_without_val_or_train_rows_stops_before_training(tmp_path, splits, missing, monkeypatch):
    """Bug checked: with no val rows stage 1 trained a whole epoch, then died in torch.cat."""
    (tmp_path / "c.csv").write_text("song_id,audio,title,artists,lyrics,split\n" + "".join(
        f"s{i},a{i}.wav,t,a,l,{s}\n" for i, s in enumerate(splits)))
    monkeypatch.setattr(pretrain, "train", lambda *a, **kw: pytest.fail("training started"))
    with pytest.raises(SystemExit, match=rf"c.csv: no '{missing}' songs \(split column values: "
                                         rf"{', '.join(sorted(set(splits)))}; 3 songs\)"):
        pretrain.main(["--catalog", str(tmp_path / "c.csv"), "--model.text_model", TINY_BERT,
                       "--no-model.text_pretrained", "--out_dir", str(tmp_path / "out")])
