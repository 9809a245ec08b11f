"""Tests of behaviour, each against an independent computation (brute force, a hand-worked
case, or a library reference). Run from the repo root:

    pip install -r requirements.txt && python -m pytest -q test_smoke.py
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import model as htcl

ROOT = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(ROOT, "sample_data")
TINY_BERT = os.path.join(SAMPLE, "tiny-bert")


def tiny_audio_config(**kw):
    return htcl.AudioConfig(conv_channels=32, hidden=32, layers=2, heads=2, ffn=64, **kw)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = htcl.HTCLConfig(audio=tiny_audio_config(), text_model=TINY_BERT, text_pretrained=False,
                          proj_dims=(24, 16), fusion_dims=(16, 16), **kw)
    return htcl.HTCL(cfg)


# -----------------------------------------------------------------------------
# Audio encoder


def test_audio_encoder_has_paper_parameter_count():
    n = sum(p.numel() for p in htcl.AudioEncoder().parameters())
    # Released code: 88,500,511. Ours lacks one LayerNorm(768) (1,536 parameters) that
    # the notes do not place; the issue allows 88.5M +- 1%.
    assert abs(n - 88_500_511) / 88_500_511 < 0.01, n
    assert n == 88_498_975  # pins the architecture: any accidental change shows up here


def test_stem_maps_1251_frames_to_155_tokens_and_17_frames_to_one():
    stem = htcl.AudioEncoder(tiny_audio_config()).stem
    # Hand-worked: floor((L - k) / s) + 1 three times: 1251 -> 624 -> 311 -> 155.
    assert stem.token_lengths(torch.tensor([1251, 17, 16])).tolist() == [155, 1, 0]
    out = stem(torch.randn(2, 1251, 128))
    assert out.shape == (2, 155, 32)


@pytest.mark.parametrize("audio_cfg", [tiny_audio_config(), htcl.AudioConfig()], ids=["tiny", "paper"])
def test_padding_does_not_change_embedding(audio_cfg):
    torch.manual_seed(0)
    enc = htcl.AudioEncoder(audio_cfg).eval()
    frames_30s = 1 + 30 * 16000 // 1536  # 313
    song = torch.randn(1, frames_30s, 128)
    with torch.no_grad():
        alone = enc(song)
        for total in (1 + 60 * 16000 // 1536, 1251):  # padded to 60 s and to 120 s
            padded = torch.cat([song, 7 * torch.randn(1, total - frames_30s, 128)], 1)  # junk in the padding
            mask = torch.zeros(1, total, dtype=torch.bool)
            mask[:, frames_30s:] = True
            torch.testing.assert_close(enc(padded, mask), alone, atol=2e-5, rtol=1e-4)
        # A batch that pads one song must give each song its own embedding.
        other = torch.randn(1, 1251, 128)
        batch = torch.cat([F.pad(song, (0, 0, 0, 1251 - frames_30s)), other])
        mask = torch.zeros(2, 1251, dtype=torch.bool)
        mask[0, frames_30s:] = True
        out = enc(batch, mask)
        torch.testing.assert_close(out[0:1], alone, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[1:2], enc(other), atol=2e-5, rtol=1e-4)
        # The padding mask matters: without it the padded frames do change the embedding.
        assert (enc(padded) - alone).abs().max() > 1e-3


def test_embedding_is_deterministic_in_eval_mode():
    enc = htcl.AudioEncoder(tiny_audio_config()).eval()
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc(x), atol=0, rtol=0)


# -----------------------------------------------------------------------------
# The symmetric InfoNCE


def brute_force_infonce(x, y, logit_scale):
    """Eq. 2-4 written as a double loop over pairs, in plain Python floats."""
    x = [[v / math.sqrt(sum(a * a for a in row)) for v in row] for row in x.tolist()]
    y = [[v / math.sqrt(sum(a * a for a in row)) for v in row] for row in y.tolist()]
    s = math.exp(logit_scale)
    B = len(x)
    sim = [[s * sum(a * b for a, b in zip(x[i], y[j])) for j in range(B)] for i in range(B)]
    l_xy = sum(-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(B))) for i in range(B)) / B
    l_yx = sum(-sim[i][i] + math.log(sum(math.exp(sim[j][i]) for j in range(B))) for i in range(B)) / B
    return 0.5 * (l_xy + l_yx)


def test_infonce_is_ln_batch_when_all_embeddings_are_equal():
    for B in (2, 7, 64):
        x = torch.ones(B, 16)
        loss = htcl.contrastive_loss(x, x.clone(), torch.tensor(2.6))
        assert loss.item() == pytest.approx(math.log(B), rel=1e-6)


def test_infonce_matches_brute_force_double_loop():
    g = torch.Generator().manual_seed(0)
    for B, D, scale in [(5, 8, 2.6), (9, 3, math.log(100)), (4, 16, 0.0)]:
        x, y = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
        got = htcl.contrastive_loss(x.double(), y.double(), torch.tensor(scale, dtype=torch.float64))
        assert got.item() == pytest.approx(brute_force_infonce(x, y, scale), rel=1e-10)


def test_infonce_gradients_pass_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(htcl.contrastive_loss, (x, y, s))


def test_logit_scale_is_clamped_to_ln_100():
    m = tiny_model()
    with torch.no_grad():
        for p in m.logit_scale.values():
            p.fill_(9.0)
    m.clamp_logit_scales()
    assert all(p.item() == pytest.approx(math.log(100)) for p in m.logit_scale.values())
    assert m.logit_scale["at"].item() == pytest.approx(math.log(100))


def _two_process_worker(rank, world, init_file, x_all, y_all, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Linear(x_all.shape[1], 6, dtype=torch.float64)  # same init on both ranks
    scale = torch.nn.Parameter(torch.tensor(2.6, dtype=torch.float64))
    B = x_all.shape[0] // world
    sl = slice(rank * B, (rank + 1) * B)
    loss = htcl.contrastive_loss(net(x_all[sl]), net(y_all[sl]), scale)
    loss.backward()
    grads = [net.weight.grad, net.bias.grad, scale.grad]
    for g in grads:  # what DDP does: average the gradients over processes
        dist.all_reduce(g)
        g /= world
    dist.all_reduce(loss.detach())
    torch.save({"loss": loss.detach() / world, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _pair_batch(tokenizer, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 60, (2, B), generator=g)
    batch = {}
    for i, side in enumerate(("trig", "rec")):
        T = int(lengths[i].max())
        batch[f"{side}_mel"] = torch.randn(B, T, 128, generator=g)
        batch[f"{side}_padding_mask"] = torch.arange(T)[None, :] >= lengths[i][:, None]
        words = [" ".join(f"w{int(v)}" for v in torch.randint(0, 50, (int(n),), generator=g))
                 for n in torch.randint(3, 12, (B,), generator=g)]
        batch[f"{side}_tokens"] = dict(tokenizer(words, padding="longest", return_tensors="pt"))
    return batch


def _slice_batch(batch, sl):
    """Rows `sl` of a batch, re-trimmed to their own longest item as a per-process collator would."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            keep = int(v["attention_mask"][sl].sum(1).max())
            out[k] = {kk: vv[sl, :keep] for kk, vv in v.items()}
        elif k.endswith("mel"):
            keep = int((~batch[k.replace("mel", "padding_mask")][sl]).sum(1).max())
            out[k] = v[sl, :keep]
            out[k.replace("mel", "padding_mask")] = batch[k.replace("mel", "padding_mask")][sl, :keep]
    return out


def _stage_loss(m, batch, stage):
    if stage == 1:
        b = {"mel": batch["rec_mel"], "padding_mask": batch["rec_padding_mask"], "tokens": batch["rec_tokens"]}
        return m(b, stage=1)[0]
    return m(batch, stage=2, use_trigger_text=True)[0]


def _ddp_worker(rank, world, init_file, stage, out_dir):
    import torch.distributed as dist
    from transformers import AutoTokenizer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    m = tiny_model().eval()  # eval: no dropout, so both runs are deterministic
    m.freeze_unused(stage=stage)
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    batch = _pair_batch(AutoTokenizer.from_pretrained(TINY_BERT))
    B = batch["rec_mel"].shape[0] // world
    loss = _stage_loss(ddp, _slice_batch(batch, slice(rank * B, (rank + 1) * B)), stage)
    loss.backward()  # DDP averages the gradients over the processes
    dist.all_reduce(loss := loss.detach())
    grads = {k: p.grad for k, p in m.named_parameters() if p.requires_grad}
    torch.save({"loss": loss / world, "grads": grads}, os.path.join(out_dir, f"ddp{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", [1, 2])
def test_ddp_stage_losses_and_gradients_match_one_process(tmp_path, stage):
    from transformers import AutoTokenizer
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), stage, str(tmp_path)), nprocs=2)
    m = tiny_model().eval()
    m.freeze_unused(stage=stage)
    loss = _stage_loss(m, _pair_batch(AutoTokenizer.from_pretrained(TINY_BERT)), stage)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"ddp{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        assert set(got["grads"]) == {k for k, p in m.named_parameters() if p.requires_grad}
        for k, p in m.named_parameters():
            if p.requires_grad:
                # fp32 sums in another order (DDP buckets): tolerance relative to the tensor's scale
                scale = p.grad.abs().max().item()
                torch.testing.assert_close(got["grads"][k], p.grad, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=k)


def test_two_processes_match_one(tmp_path):
    """Negatives from every process and correct gradients: loss and gradients of 2 gloo
    processes (each holding half the batch) equal 1 process on the whole batch."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, dtype=torch.float64, generator=g), torch.randn(8, 5, dtype=torch.float64, generator=g)
    torch.multiprocessing.spawn(_two_process_worker, args=(2, str(tmp_path / "init"), x, y, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 6, dtype=torch.float64)
    scale = torch.nn.Parameter(torch.tensor(2.6, dtype=torch.float64))
    loss = htcl.contrastive_loss(net(x), net(y), scale)
    loss.backward()
    for rank in range(2):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        for a, b in zip(got["grads"], [net.weight.grad, net.bias.grad, scale.grad]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -----------------------------------------------------------------------------
# Stage hand-off


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


def test_wrapper_prefixes_are_stripped_from_saved_weights():
    state = {"module._orig_mod.audio_proj.0.weight": torch.ones(2), "module.logit_scale.at": torch.zeros(())}
    assert sorted(htcl.clean_state_dict(state)) == ["audio_proj.0.weight", "logit_scale.at"]


# -----------------------------------------------------------------------------
# End to end on sample_data, through the command lines a user types

PRESET = os.path.join("sample_data", "preset.toml")


def run(*cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


def read_log(out_dir):
    import json
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    run(sys.executable, "data.py", "prepare", "--catalog", "sample_data/catalog.csv", "--cache", cache)
    return cache


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, demo_cache):
    out = tmp_path_factory.mktemp("pretrain")
    run(sys.executable, "pretrain.py", "--preset", PRESET, "--cache", demo_cache, "--out_dir", out)  # the demo's run
    return out


def test_stage1_learns_below_chance_and_beats_chance_retrieval(stage1):
    train, val = read_log(stage1)
    assert len(val) == 12
    ln_b = math.log(64)
    assert train[-1]["ln_B"] == pytest.approx(ln_b)
    assert train[-1]["loss"] < 0.8 * ln_b, train[-1]
    assert val[-1]["val_loss"] < 0.8 * ln_b, val[-1]
    # 63 held-out songs: chance R@10 is 10/63 = 0.16
    assert val[-1]["a2t_R@10"] > 2 * val[-1]["chance_R@10"], val[-1]


def test_stage2_trains_from_the_stage1_artifact_and_its_artifact_loads(tmp_path, stage1, demo_cache):
    out = tmp_path / "finetune"
    log = run(sys.executable, "finetune.py", "--preset", PRESET, "--cache", demo_cache,
              "--init_from", stage1 / "final", "--out_dir", out, "--epochs", 1, "--max_steps", 12)
    assert "init_from" in log
    train, val = read_log(out)
    assert {"loss_aa", "loss_af", "loss_at"} <= set(train[-1])
    assert train[-1]["loss_at"] < math.log(64)  # the text alignment of stage 1 carried over
    m1, _ = htcl.load_artifact(stage1 / "final")
    m2, tok = htcl.load_artifact(out / "final")
    assert m2.cfg == m1.cfg
    changed = [k for k, v in m2.state_dict().items() if not torch.equal(v, m1.state_dict()[k])]
    assert any(k.startswith("audio_encoder.") for k in changed) and any(k.startswith("fusion.") for k in changed)


def test_resume_after_kill_mid_epoch_replays_the_same_losses(tmp_path, demo_cache):
    """kill -9 in the middle of an epoch, --resume: model, optimizer, scheduler, RNG and data
    order come back, so every later step has the loss of an uninterrupted run."""
    import signal
    import time
    common = [sys.executable, "pretrain.py", "--preset", PRESET, "--cache", demo_cache, "--epochs", 3,
              "--log_every", 1, "--checkpoint_every", 3]
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


def test_nonfinite_steps_are_skipped_counted_and_abort_when_persistent(tmp_path, demo_cache):
    import pretrain
    from transformers import AutoTokenizer

    def setup(out):
        cfg = pretrain.parse_config(pretrain.PretrainConfig, "pretrain", [
            "--preset", PRESET, "--cache", str(demo_cache), "--out_dir", str(out), "--epochs", "2",
            "--max_steps", "6", "--log_every", "1", "--max_nonfinite_steps", "3"])
        catalog, cache, train_rows, val_rows = pretrain.load_songs(cfg)
        model = htcl.HTCL(cfg.model)
        model.freeze_unused(stage=1)
        val = data.SongDataset(catalog, val_rows, cache)
        return cfg, model, AutoTokenizer.from_pretrained(cfg.model.text_model), \
            data.SongDataset(catalog, train_rows, cache), val

    import data
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
