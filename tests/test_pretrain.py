"""Tests of pretrain.py, stage 1 (Sec. 3.1.1): the training loop (logit-scale clamp, non-finite
steps, validation without dropout, a fixed temperature), optimizer groups, accelerate launch with
two CPU processes, the demo preset from another directory, and its command-line errors.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_pretrain.py
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import model as htcl

from tests.helpers import (PRESET, ROOT, SAMPLE, TINY_BERT, _pair_batch, _stage_loss, read_log, run,
                           sample_songs_cache, tiny_model)
from tests.own_songs import stage1_argv, write_world
import pretrain
from evals import metrics
from evals.embeddings import embed_catalog


def test_stage1_learns_below_chance_and_beats_chance_retrieval(stage1):
    train, val = read_log(stage1)
    assert len(val) == 12
    ln_b = math.log(64)
    assert train[-1]["ln_B"] == pytest.approx(ln_b)
    assert train[-1]["loss"] < 0.8 * ln_b, train[-1]
    assert val[-1]["val_loss"] < 0.8 * ln_b, val[-1]
    # 63 held-out songs: chance R@10 is 10/63 = 0.16
    assert val[-1]["a2t_R@10"] > 2 * val[-1]["chance_R@10"], val[-1]


# The CrossMuSim variant draws a random crop and text per sample and epoch: with one text type
# (aspects) it has one sample per song, so the same 7 steps an epoch as HTCL's stage 1.
RESUME_VARIANTS = {"htcl": [PRESET],
                   "crossmusim": [os.path.join("sample_data", "crossmusim.toml"), "--text_types", "aspects"]}


@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_resume_after_kill_mid_epoch_replays_the_same_losses(tmp_path, demo_cache, variant):
    """kill -9 in the middle of an epoch, --resume: model, optimizer, scheduler, RNG and data
    order (and the variant's random crops and texts) come back, so every later step has the loss
    of an uninterrupted run."""
    common = [sys.executable, "pretrain.py", "--preset", *RESUME_VARIANTS[variant], "--cache", demo_cache,
              "--epochs", 3, "--log_every", 1, "--checkpoint_every", 3]
    run(*common, "--out_dir", tmp_path / "full")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([str(c) for c in common + ["--out_dir", tmp_path / "cut"]], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "checkpoints" / "step_000000009"  # 7 steps/epoch: step 9 is 2 batches into epoch 1
    deadline = time.time() + 300
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ckpt.exists() and not (tmp_path / "cut" / "final").exists(), "the run finished before the kill"
    out = run(*common, "--out_dir", tmp_path / "cut", "--resume")
    import re
    resumed = re.search(r"resumed from .*step_(\d+): epoch (\d+), step \d+, (\d+) batches into the epoch", out)
    assert resumed and int(resumed.group(3)) > 0, out[-2000:]  # really mid-epoch
    full, full_val = read_log(tmp_path / "full")
    cut_rows, cut_val = read_log(tmp_path / "cut")
    cut = {r["step"]: r for r in cut_rows}  # the resumed run rewrites the steps the killed one logged
    assert sorted(cut) == [r["step"] for r in full] == list(range(1, 22))
    for b in full:
        a = cut[b["step"]]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert cut_val[-1]["val_loss"] == pytest.approx(full_val[-1]["val_loss"], rel=1e-5)


def _demo_stage1_setup(demo_cache, out, *flags):
    """What pretrain.main builds for the demo preset (plus `flags`), for calling pretrain.train in-process:
    (cfg, model, tokenizer, train set, held-out set)."""
    import pretrain
    import training
    from transformers import AutoTokenizer
    cfg = training.parse_config(pretrain.PretrainConfig, "pretrain", [
        "--preset", PRESET, "--cache", str(demo_cache), "--out_dir", str(out), *flags])
    catalog, cache, train_rows, val_rows = pretrain.load_songs(cfg)
    model = htcl.HTCL(cfg.model)
    model.freeze_unused(stage=1)
    val = data.SongDataset(catalog, val_rows, cache)
    return cfg, model, AutoTokenizer.from_pretrained(cfg.model.text_model), \
        data.SongDataset(catalog, train_rows, cache), val


def test_nonfinite_steps_are_skipped_counted_and_abort_when_persistent(tmp_path, demo_cache):
    import pretrain

    def setup(out):
        return _demo_stage1_setup(demo_cache, out, "--epochs", "2", "--max_steps", "6", "--log_every", "1",
                                  "--max_nonfinite_steps", "3")

    calls = []

    def nan_on_calls(bad):
        def loss_fn(m, batch):
            loss, parts = m(batch, stage=1)
            if m.training:
                calls.append(1)
                if bad(len(calls)):
                    loss = loss * float("nan")
            return loss, parts
        return loss_fn

    cfg, model, tok, train_set, val = setup(tmp_path / "a")
    metrics = pretrain.train(cfg, model, tok, nan_on_calls(lambda i: i in (2, 3)), train_set, val, val, stage=1)
    assert metrics["skipped_nonfinite"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    train, _ = read_log(tmp_path / "a")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # 8 batches, 2 of them skipped
    assert all(math.isfinite(r["loss"]) for r in train)

    calls.clear()
    cfg, model, tok, train_set, val = setup(tmp_path / "b")
    with pytest.raises(SystemExit, match="3 non-finite steps in a row"):
        pretrain.train(cfg, model, tok, nan_on_calls(lambda i: i >= 2), train_set, val, val, stage=1)


def test_accelerate_launch_with_two_cpu_processes(tmp_path, demo_cache):
    out = tmp_path / "ddp"
    # On a machine without GPUs, --multi_gpu is how accelerate starts several processes (torchrun);
    # the scripts then run gloo on CPU. (`--cpu --num_processes 2` starts one process unless mpirun is set up.)
    log = run(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", 2,
              "--num_machines", 1, "--mixed_precision", "no", "--dynamo_backend", "no",
              "pretrain.py", "--preset", PRESET, "--cache", demo_cache, "--out_dir", out,
              "--batch_per_device", 16, "--global_batch", 64, "--epochs", 1, "--max_steps", 3, "--log_every", 1)
    assert "2 process(es) x 16 x 2 accumulation = global batch 64" in log
    assert log.count("step      3/3") == 1  # logged by the main process only
    train, val = read_log(out)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert val[-1]["val_songs"] == 63  # every held-out song embedded exactly once over 2 processes
    htcl.load_artifact(out / "final")


def test_audio_lr_gives_the_audio_encoder_its_own_group():
    import pretrain
    m = tiny_model()
    cfg = pretrain.PretrainConfig(lr=1e-4, audio_lr=1e-5, text_lr=3e-5)
    opt = pretrain.build_optimizer(m, cfg, "cpu")
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in m.named_parameters():
        want = 3e-5 if name.startswith("text_encoder.") else 1e-5 if name.startswith("audio_encoder.") else 1e-4
        assert lr_of[id(p)] == want, name


# Checked by making its bug by hand: pretrain.train without net.clamp_logit_scales().
def test_training_loop_clamps_every_logit_scale_to_ln_100_after_each_step(tmp_path, demo_cache):
    """A loss that rewards a larger logit scale (as a well-aligned batch does late in training),
    a large lr, and a start just under the cap: the scale hits ln 100 at once, and the loop must
    clamp it after every optimizer step (every value the loss sees, and the final one)."""
    import pretrain
    cap = torch.tensor(math.log(100)).item()  # the float32 value that clamp_ writes
    cfg, model, tok, train_set, val = _demo_stage1_setup(
        demo_cache, tmp_path, "--epochs", "1", "--max_steps", "3", "--lr", "1.0", "--warmup_ratio", "0",
        "--batch_per_device", "16", "--global_batch", "16", "--model.logit_scale_init", "4.5")
    seen = []

    def pushes_the_scale_up(m, batch):
        loss, parts = m(batch, stage=1)
        scale = getattr(m, "module", m).logit_scale["at"]
        if m.training:
            seen.append(scale.item())
        return loss - 10 * scale, parts

    pretrain.train(cfg, model, tok, pushes_the_scale_up, train_set, torch.utils.data.Subset(val, range(16)),
                   torch.utils.data.Subset(val, range(16)), stage=1)
    seen.append(model.logit_scale["at"].item())
    assert len(seen) == 4 and seen[0] == pytest.approx(4.5)
    assert max(seen) <= cap and seen[-1] == cap, seen  # reached the cap and never went past it
    from safetensors.torch import load_file
    assert load_file(tmp_path / "final" / "model.safetensors")["logit_scale.at"].item() <= cap


def _song_batches(n_batches=2, B=4):
    """Stage-1 batches (mel, padding_mask, tokens) of random songs, from _pair_batch's rec side."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_BERT)
    out = []
    for seed in range(n_batches):
        b = _pair_batch(tok, B=B, seed=seed)
        out.append({"mel": b["rec_mel"], "padding_mask": b["rec_padding_mask"], "tokens": b["rec_tokens"]})
    return out


# Checked by making its bug by hand: pretrain.validate without model.eval().
def test_validation_runs_without_dropout_even_on_a_model_left_in_train_mode():
    import pretrain
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    batches = _song_batches()
    m = tiny_model().train()
    with torch.no_grad():
        m.eval()
        want = np.mean([pretrain.stage1_loss(m, b)[0].item() for b in batches])  # eval mode by hand
        m.train()
        noisy = pretrain.stage1_loss(m, batches[0])[0].item()
    assert abs(noisy - pretrain.stage1_loss(m.eval(), batches[0])[0].item()) > 1e-4  # dropout does matter here
    got = []
    for _ in range(2):
        m.train()  # as the training loop leaves it
        got.append(pretrain.validate(accelerator, m, pretrain.stage1_loss, batches, batches)["val_loss"])
        assert m.training  # handed back in train mode
    assert got[0] == got[1] == pytest.approx(want, rel=1e-6, abs=1e-7), (got, want)


@pytest.mark.parametrize("learn", [False, True])
def test_a_fixed_temperature_stays_fixed_through_training_steps(learn):
    import pretrain
    from transformers import AutoTokenizer
    tau_init = math.log(1 / 0.07)
    m = tiny_model(learn_temperature=learn, logit_scale_init=tau_init).train()
    m.freeze_unused(stage=1)
    cfg = pretrain.TrainConfig(lr=1e-2, text_lr=1e-2)
    opt = pretrain.build_optimizer(m, cfg, "cpu")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert (id(m.logit_scale["at"]) in in_opt) is learn
    batch = _pair_batch(AutoTokenizer.from_pretrained(TINY_BERT), B=6)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(3):
        loss = _stage_loss(m, batch, 1)
        loss.backward()
        opt.step()
        opt.zero_grad()
        m.clamp_logit_scales()
    assert m.logit_scale["at"].grad is None or learn
    assert 1 / math.exp(before["logit_scale.at"].item()) == pytest.approx(0.07, rel=1e-6)
    moved = m.logit_scale["at"].item() != before["logit_scale.at"].item()
    assert moved is learn  # fixed: bit for bit tau = 0.07 still; learnable: it moved
    assert not torch.equal(before["audio_proj.0.weight"], m.audio_proj[0].weight)  # the rest did train


def test_demo_preset_runs_from_another_directory_and_draws_its_curves(tmp_path, demo_cache):
    """Preset paths are read from the preset's folder; curves.png is drawn from log.jsonl."""
    from training import plot_curves
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain.py"),
                        "--preset", os.path.relpath(os.path.join(ROOT, PRESET), elsewhere),
                        "--cache", str(demo_cache), "--out_dir", "out_here", "--max_steps", "2", "--log_every", "1"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    out = elsewhere / "out_here"  # a command-line path stays relative to the working directory
    training = json.loads((out / "final" / "config.json").read_text())
    assert training["training"]["catalog"] == os.path.join(SAMPLE, "catalog.csv")
    assert training["text_model"] == TINY_BERT
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    drawn = plot_curves(str(out / "log.jsonl"), str(tmp_path / "again.png"))
    train_rows, val_rows = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
    assert len(train_rows) == 2 and len(val_rows) == 1
    loss_panel, recall_panel, lr_panel, temp_panel = drawn.values()
    assert loss_panel["loss"] == ([r["step"] for r in train_rows], [r["loss"] for r in train_rows])
    assert loss_panel["ln_B"][1] == [math.log(64)] * 2
    assert recall_panel["a2t_R@10"] == ([val_rows[0]["step"]], [val_rows[0]["a2t_R@10"]])
    assert recall_panel["chance_R@10"][1] == [val_rows[0]["chance_R@10"]]
    assert lr_panel["lr"][1] == [r["lr"] for r in train_rows]
    assert list(temp_panel) == ["temp_at"] and all(0 < t < 1 for t in temp_panel["temp_at"][1])


def test_missing_text_model_is_one_line_that_says_how_to_fix_it(capsys):
    import pretrain
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--catalog", os.path.join(SAMPLE, "catalog.csv"), "--model.text_model", "no-such-org/no-bert"])
    msg = str(e.value.code)
    assert msg.startswith("Error: text model 'no-such-org/no-bert'") and "\n" not in msg
    assert "--model.text_model" in msg and "HF_HUB_OFFLINE=1" in msg and "hf download no-such-org/no-bert" in msg


def test_batch_size_errors_name_both_flags():
    import pretrain
    for sizes in (("64", "48"), ("1000", "1000")):  # not a multiple; more than the training songs
        with pytest.raises(SystemExit) as e:
            pretrain.main(["--preset", os.path.join(SAMPLE, "preset.toml"), "--cache", "", "--max_steps", "1",
                           "--global_batch", sizes[0], "--batch_per_device", sizes[1]])
        assert "--global_batch" in str(e.value.code) and "--batch_per_device" in str(e.value.code)


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


def test_text_lr_0_freezes_the_text_tower_and_weight_decay_spares_text_and_temperatures():
    import pretrain
    m = tiny_model()
    m.freeze_unused(stage=1)
    opt = pretrain.build_optimizer(m, pretrain.PretrainConfig(text_lr=0.0, weight_decay=0.05), "cpu")
    assert type(opt) is torch.optim.AdamW
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in m.named_parameters():
        if name.startswith("text_encoder."):
            assert not p.requires_grad and id(p) not in decay_of, name  # frozen: no gradient, no state
        elif p.requires_grad:
            assert decay_of[id(p)] == (0.0 if name.startswith("logit_scale.") else 0.05), name
    assert type(pretrain.build_optimizer(tiny_model(), pretrain.PretrainConfig(), "cpu")) is torch.optim.Adam  # paper: no decay


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
    return sample_songs_cache(tmp_path_factory.mktemp("world"), 20)


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


def test_the_collapse_warning_is_judged_on_the_last_epoch_not_on_an_early_low_rank_phase(world, tmp_path, capsys,
                                                                                        monkeypatch):
    """Early epochs of a healthy run can look collapsed (the demo's stage 1 does for 7 of 12): the
    warning waits for the last validation, and does fire when that one is collapsed."""
    catalog, cache = world
    real = pretrain.embed_songs
    for name, plan in (("recovers", (2, None)), ("ends_collapsed", (None, 2))):
        calls = []

        def planted(accelerator, model, loader):
            audio, text = real(accelerator, model, loader)
            calls.append(len(audio))
            if len(calls) == 1:  # the start: the untrained encoder's own
                return audio, text
            return _spread(len(audio), plan[len(calls) - 2], seed=len(calls)), text
        monkeypatch.setattr(pretrain, "embed_songs", planted)
        pretrain.main(stage1_argv(catalog, cache, tmp_path / name, "--lr", "0", "--text_lr", "0", "--epochs", "2"))
        out = capsys.readouterr()
        said = out.out + out.err
        assert len(calls) == 3  # the start, then each epoch's validation
        assert ("look collapsed" in said) == (name == "ends_collapsed"), (name, said[-2000:])
        if name == "ends_collapsed":
            assert "epoch 1: WARNING" in said and "epoch 0: WARNING" not in said

