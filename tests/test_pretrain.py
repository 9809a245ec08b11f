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


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """20 songs of sample_data in a log-mel cache; no split column, so the seeded 90/10 split."""
    import csv

    import data
    tmp = tmp_path_factory.mktemp("world")
    with open(os.path.join(ROOT, "sample_data", "catalog.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:20]
    path = tmp / "catalog.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["song_id", "audio", "title", "artists", "lyrics"])
        w.writerows([[r["song_id"], os.path.join(ROOT, "sample_data", r["audio"]), r["title"], r["artists"],
                      r["lyrics"]] for r in rows])
    data.prepare(str(path), str(tmp / "cache"))
    return path, tmp / "cache"


def test_resuming_from_an_epoch_end_checkpoint_starts_the_next_epoch(tmp_path, small_world):
    """Bug checked (made by hand): the epoch-end checkpoint recorded its own epoch, so --resume
    trained that epoch a second time."""
    import json
    catalog, cache = small_world
    argv = ["--preset", os.path.join(ROOT, "sample_data", "preset.toml"), "--catalog", str(catalog), "--cache",
            str(cache), "--out_dir", str(tmp_path), "--batch_per_device", "8", "--global_batch", "8",
            "--log_every", "1", "--checkpoint_every", "0", "--num_workers", "0"]
    pretrain.main(argv + ["--epochs", "1"])
    progress = json.loads(open(sorted((tmp_path / "checkpoints").glob("step_*"))[-1] / "progress.json").read())
    assert progress == {"epoch": 1, "step": 2, "batches": 0}  # 18 train songs: 2 full batches of 8
    pretrain.main(argv + ["--epochs", "2", "--resume"])
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["epoch"] for r in rows if "val_loss" in r] == [0, 1]  # epoch 0 once, then epoch 1
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
