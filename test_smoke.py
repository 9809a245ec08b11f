"""Smoke test: the whole two-stage pipeline (Sec. 3.1.1 stage 1, Sec. 3.1.2 stage 2, Sec. 3.2
Table 2) on the bundled sample data, through the command lines a user types (data.py prepare ->
pretrain.py -> finetune.py -> evaluate.py report), a stage-1 run resumed mid-epoch from a checkpoint
that replays the uninterrupted run, and the contracts CI must never lose: the paper's 88,500,511
audio-encoder parameters, 1,251 frames for 120 s of audio, InfoNCE equal to a brute-force loop, and
an artifact that round-trips bit for bit. About 50 s of CPU (it runs two commands side by side on
2 cores); the thorough tests, one file a module, are in tests/: python -m pytest -q test_smoke.py tests

    python -m pytest -q test_smoke.py
"""
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # the repo's modules and tests.helpers, from any working directory

import data  # noqa: E402
import model as htcl  # noqa: E402
from tests.helpers import (PRESET, TINY_BERT, brute_force_infonce, demo_cache_in, read_log, run,  # noqa: E402
                           tiny_model, tone)
from tests.conftest import one_thread  # noqa: E402,F401  (autouse: one torch thread a test, as in tests/)

# -----------------------------------------------------------------------------
# The contracts


def test_audio_encoder_has_paper_parameter_count():
    n = sum(p.numel() for p in htcl.AudioEncoder().parameters())
    # The released AudioModel(input_dim=128), counted module by module: stem 3 x (conv + LN),
    # LN + Linear 512 -> 768, positional conv (weight-normed) + its LayerNorm(768), LN, [CLS],
    # 12 nn.TransformerEncoderLayer(768, 12, 3072).
    D, C = 768, 512
    stem = 128 * C * 5 + C * C * 3 + C * C * 3 + 3 * 2 * C
    pos = (D * (D // 16) * 31 + 31) + D + 2 * D  # v, g (one per kernel tap: dim=2), bias; LayerNorm
    layer = (3 * D * D + 3 * D) + (D * D + D) + (D * 3072 + 3072) + (3072 * D + D) + 2 * 2 * D
    assert n == stem + 2 * C + C * D + D + pos + 2 * D + D + 12 * layer == 88_500_511


def test_infonce_matches_brute_force_double_loop():
    g = torch.Generator().manual_seed(0)
    for B, D, scale in [(5, 8, 2.6), (9, 3, math.log(100)), (4, 16, 0.0)]:
        x, y = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
        got = htcl.contrastive_loss(x.double(), y.double(), torch.tensor(scale, dtype=torch.float64))
        assert got.item() == pytest.approx(brute_force_infonce(x, y, scale), rel=1e-10)


def test_artifact_round_trip_gives_identical_embeddings(tmp_path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(TINY_BERT)
    m = tiny_model().eval()
    htcl.save_artifact(m, tokenizer, tmp_path / "art")
    assert sorted(os.listdir(tmp_path / "art")) >= ["config.json", "model.safetensors"]
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "art" / "model.safetensors").keys()
    assert not [k for k in keys if k.startswith(("module.", "_orig_mod."))]
    assert set(keys) == set(m.state_dict().keys())

    loaded, tok2 = htcl.load_artifact(tmp_path / "art")
    assert not loaded.training
    tokens = tok2(["title: a; artists: b; lyrics: c d e"], return_tensors="pt")
    assert tokens["input_ids"].tolist() == tokenizer(["title: a; artists: b; lyrics: c d e"],
                                                     return_tensors="pt")["input_ids"].tolist()
    mel = torch.randn(2, 60, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_audio(mel), m.encode_audio(mel), atol=0, rtol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), m.encode_text(tokens), atol=0, rtol=0)
    assert loaded.cfg == m.cfg


def test_120s_song_gives_1251_frames_and_30s_gives_313():
    rng = np.random.default_rng(0)
    assert data.log_mel(torch.from_numpy(rng.standard_normal(120 * 16000).astype(np.float32)), 16000).shape == (1251, 128)
    assert data.log_mel(torch.from_numpy(tone(30)), 16000).shape == (1 + 480000 // 1536, 128)


# -----------------------------------------------------------------------------
# The pipeline on sample_data, short: 2 epochs of stage 1 (14 steps), 8 steps of stage 2


def run_side_by_side(*cmds, timeout=600):
    """Run the commands at once (one thread each: a 2-core machine runs two), like helpers.run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in cmds]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for cmd, p, out in zip(cmds, procs, outs):
        assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out[-5000:]}"
    return outs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's commands on sample_data with the demo preset, shortened: stage 1 for 2 epochs with a
    checkpoint every 3 steps; then side by side stage 2 from its artifact for 8 steps, and stage 1
    again from the first run's mid-epoch checkpoint at step 9 (2 of an epoch's 7 batches done);
    then the Table 2 report over both artifacts and random embeddings."""
    cache = demo_cache_in(tmp_path_factory)
    d = tmp_path_factory.mktemp("demo")
    stage1 = [sys.executable, "pretrain.py", "--preset", PRESET, "--cache", cache, "--epochs", 2,
              "--checkpoint_every", 3, "--keep_checkpoints", 10, "--log_every", 1]
    run(*stage1, "--out_dir", d / "stage1")
    shutil.copytree(d / "stage1" / "checkpoints" / "step_000000009", d / "resumed" / "checkpoints" / "step_000000009")
    resumed, finetuned = run_side_by_side(
        stage1 + ["--out_dir", d / "resumed", "--resume"],
        [sys.executable, "finetune.py", "--preset", PRESET, "--cache", cache, "--init_from", d / "stage1" / "final",
         "--out_dir", d / "stage2", "--epochs", 1, "--max_steps", 8, "--log_every", 1])
    run(sys.executable, "evaluate.py", "report", "--catalog", "sample_data/catalog.csv", "--cache", cache,
        "--favourites", "sample_data/favourites.csv", "--impressions", "sample_data/impressions.csv",
        "--emb", d / "stage1" / "final", "--emb", d / "stage2" / "final", "--emb", "random",
        "--probe_seeds", 1, "--out", d / "report")
    return {"dir": d, "resumed_log": resumed, "finetune_log": finetuned}


def test_stage1_trains_below_chance_and_retrieves_above_chance_in_two_epochs(demo):
    train, val = read_log(demo["dir"] / "stage1")
    assert [r["step"] for r in train] == list(range(1, 15)) and len(val) == 2
    assert all(math.isfinite(r["loss"]) for r in train)
    # on the demo: held-out loss 4.02 against chance ln 64 = 4.16; 20 of 63 songs found in the top 10, chance 10
    assert val[-1]["val_loss"] < train[-1]["ln_B"] == pytest.approx(math.log(64)), val[-1]
    assert val[-1]["a2t_R@10"] > 1.5 * val[-1]["chance_R@10"], val[-1]


def test_resumed_stage1_replays_the_uninterrupted_run_step_for_step(demo):
    from safetensors.torch import load_file
    d = demo["dir"]
    assert "step_000000009: epoch 1, step 9, 2 batches into the epoch" in demo["resumed_log"]
    full, full_val = read_log(d / "stage1")
    resumed, resumed_val = read_log(d / "resumed")
    assert [r["step"] for r in resumed] == list(range(10, 15))  # only the steps after the checkpoint
    by_step = {r["step"]: r for r in full}
    for r in resumed:
        assert r["loss"] == pytest.approx(by_step[r["step"]]["loss"], rel=1e-5, abs=1e-6), (r, by_step[r["step"]])
        assert r["lr"] == pytest.approx(by_step[r["step"]]["lr"], rel=1e-9)
    assert resumed_val[-1]["val_loss"] == pytest.approx(full_val[-1]["val_loss"], rel=1e-5)
    want, got = load_file(d / "stage1" / "final" / "model.safetensors"), load_file(d / "resumed" / "final" / "model.safetensors")
    start = load_file(d / "stage1" / "checkpoints" / "step_000000009" / "model.safetensors")
    assert set(got) == set(want) == set(start)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert max((want[k] - start[k]).abs().max().item() for k in want) > 1e-4  # steps 10-14 did move the weights


def test_stage2_starts_from_the_stage1_artifact_and_the_report_scores_both(demo):
    import json
    d = demo["dir"]
    assert "init_from" in demo["finetune_log"]
    train, val = read_log(d / "stage2")
    assert [r["step"] for r in train] == list(range(1, 9)) and len(val) == 1
    assert {"loss_aa", "loss_af", "loss_at"} <= set(train[-1]) and math.isfinite(train[-1]["loss"])
    m1, _ = htcl.load_artifact(d / "stage1" / "final")
    m2, _ = htcl.load_artifact(d / "stage2" / "final")
    assert m2.cfg == m1.cfg
    torch.manual_seed(1)
    fresh = htcl.HTCL(m1.cfg).state_dict()
    s1, s2 = m1.state_dict(), m2.state_dict()
    encoders = [k for k in s1 if k.startswith(("audio_encoder.", "text_encoder.")) and s1[k].is_floating_point()]

    def distance(a):
        return math.sqrt(sum(((a[k] - s1[k]) ** 2).sum().item() for k in encoders))
    assert distance(s2) < 0.2 * distance(fresh)  # 8 steps from stage 1's encoders, not a fresh start
    table = (d / "report" / "table2.md").read_text()
    assert table.count("\n") == 5 and "| stage1 | " in table and "| stage2 | " in table  # header, rule, 3 models
    png = (d / "report" / "figure2.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    res = json.loads((d / "report" / "table2.json").read_text())
    assert list(res) == ["stage1", "stage2", "random"]
    for row in res.values():
        assert 0 <= row["hr@100"] <= 1 and 0 <= row["ctr_auc"][0] <= 1 and 0 <= row["fig2_auc"] <= 1, res
    assert res["stage1"]["acc_genre"][0] > res["random"]["acc_genre"][0] + 0.2, res  # stage 1 hears genre
