"""Tests of pretrain.py's validation: the collapse measures it logs and the warning it prints.

    python -m pytest -q tests/test_pretrain.py
"""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from own_songs import stage1_argv, write_world  # noqa: E402

import data  # noqa: E402
import model as htcl  # noqa: E402
import pretrain  # noqa: E402
from evals import metrics  # noqa: E402
from evals.embeddings import embed_catalog  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BERT = os.path.join(ROOT, "sample_data", "tiny-bert")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(str(tmp_path_factory.mktemp("world")))


def _log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_validation_logs_the_spectrum_and_mean_cosine_of_the_held_out_audio_embeddings(world, tmp_path, capsys):
    catalog, cache = world
    pretrain.main(stage1_argv(catalog, cache, tmp_path / "run", "--epochs", "2"))
    rows = _log(tmp_path / "run")
    start = [r for r in rows if "start_audio_pr" in r]
    val = [r for r in rows if "val_loss" in r]
    assert len(start) == 1 and len(val) == 2
    # The last validation scored the final weights: recompute from the artifact by brute force.
    c = data.load_catalog(catalog)
    model, tok = htcl.load_artifact(str(tmp_path / "run" / "final"))
    held_out = data.split_rows(c, "val")
    e = embed_catalog(model, tok, c, held_out, cache=data.MelCache.open(cache, c), kinds=("audio", "text"))
    u = e["audio"] / np.linalg.norm(e["audio"], axis=1, keepdims=True)
    n = len(u)
    brute_cos = (u @ u.T)[~np.eye(n, dtype=bool)].mean()
    lam = np.linalg.eigvalsh(np.cov(u.T))
    assert val[-1]["val_songs"] == n
    assert val[-1]["audio_mean_cos"] == pytest.approx(brute_cos, abs=1e-4)
    assert val[-1]["audio_pr"] == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum(), rel=1e-3)
    assert val[-1]["text_mean_cos"] == pytest.approx(metrics.mean_pairwise_cosine(e["text"]), abs=1e-4)
    out = capsys.readouterr()
    assert "at the start (untrained encoder): participation ratio" in out.out + out.err


def _spread(n, k, seed):
    """Unit-scale embeddings: a shared direction plus variation in k others (k = 2: the collapsed
    run's regime), or, k = None, Gaussian vectors spread over all 8 dimensions."""
    g = torch.Generator().manual_seed(seed)
    if k is None:
        return torch.randn(n, 8, generator=g)
    x = 0.01 * torch.randn(n, 8, generator=g)
    x[:, 0] += 1.0
    x[:, 1:1 + k] += 0.5 * torch.randn(n, k, generator=g)
    return x


def test_the_epoch_line_warns_of_collapsed_audio_embeddings_and_not_of_spread_ones(world, tmp_path, capsys,
                                                                                   monkeypatch):
    """The loop's wiring: the validation's held-out audio embeddings (here planted, in place of the
    tiny towers' own) decide the warning; the start's are quoted beside them."""
    catalog, cache = world
    real = pretrain.embed_songs
    for name, k in (("collapsed", 2), ("spread", None)):
        calls = []

        def planted(accelerator, model, loader):
            audio, text = real(accelerator, model, loader)
            calls.append(len(audio))
            return (audio if len(calls) == 1 else _spread(len(audio), k, seed=len(calls))), text
        monkeypatch.setattr(pretrain, "embed_songs", planted)
        pretrain.main(stage1_argv(catalog, cache, tmp_path / name, "--lr", "0", "--text_lr", "0"))
        out = capsys.readouterr()
        said = out.out + out.err
        assert len(calls) == 2  # the start, then epoch 0's validation
        assert ("look collapsed" in said) == (k == 2), (name, said[-2000:])
        if k == 2:
            assert "learning rate too high" in said and "(untrained encoder: " in said


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
