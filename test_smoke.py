"""Tests of behaviour, each against an independent computation (brute force, a hand-worked
case, or a library reference), named for what they protect. Run from the repo root:

    pip install -r requirements.txt pytest && python -m pytest -q test_smoke.py

Sections: model (audio encoder, InfoNCE, distributed loss, hand-off) -> data (log-mel,
catalogs, cache) -> faults (bad audio and files, security) -> evaluation metrics and
protocols -> end to end on sample_data through the command lines (both stages, kill and
resume, non-finite steps, accelerate launch with 2 processes).
"""
import argparse
import ast
import csv
import filecmp
import importlib.util
import json
import math
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import data
import evaluate as ev
from evals import artist_graph, crossmusim, embeddings, metrics, search as evsearch
import model as htcl
from data import AudioError, CatalogError
from tools import convert_released, released_reference

ROOT = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(ROOT, "sample_data")
TINY_BERT = os.path.join(SAMPLE, "tiny-bert")
_spec = importlib.util.spec_from_file_location("make_world", os.path.join(SAMPLE, "make_world.py"))
world_gen = importlib.util.module_from_spec(_spec)  # sample_data/make_world.py, the synthetic world
_spec.loader.exec_module(world_gen)


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
    # The released AudioModel(input_dim=128), counted module by module: stem 3 x (conv + LN),
    # LN + Linear 512 -> 768, positional conv (weight-normed) + its LayerNorm(768), LN, [CLS],
    # 12 nn.TransformerEncoderLayer(768, 12, 3072).
    D, C = 768, 512
    stem = 128 * C * 5 + C * C * 3 + C * C * 3 + 3 * 2 * C
    pos = (D * (D // 16) * 31 + 31) + D + 2 * D  # v, g (one per kernel tap: dim=2), bias; LayerNorm
    layer = (3 * D * D + 3 * D) + (D * D + D) + (D * 3072 + 3072) + (3072 * D + D) + 2 * 2 * D
    assert n == stem + 2 * C + C * D + D + pos + 2 * D + D + 12 * layer == 88_500_511


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


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_keeps_loss_and_gradients_and_stores_less(stage):
    """Training mode, dropout on: recomputation replays the RNG, so loss and every gradient equal the
    run without it; the tensors kept for backward (counted through saved_tensors_hooks) shrink."""
    from transformers import AutoTokenizer
    batch = _pair_batch(AutoTokenizer.from_pretrained(TINY_BERT), B=4)
    runs = {}
    for on in (False, True):
        m = tiny_model().train()
        m.freeze_unused(stage=stage)
        m.set_gradient_checkpointing(audio=on, text=on)
        saved = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = _stage_loss(m, batch, stage)
        loss.backward()
        runs[on] = (loss.item(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}, sum(saved))
        assert m.cfg.audio.gradient_checkpointing is on and m.text_encoder.checkpointing is on
    (l0, g0, s0), (l1, g1, s1) = runs[False], runs[True]
    assert l1 == pytest.approx(l0, rel=1e-6) and g0.keys() == g1.keys() and len(g0) > 20
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
    assert s1 < 0.6 * s0, (s1, s0)


def test_finetune_refuses_an_unknown_checkpointing_setting(tmp_path, capsys):
    import finetune
    with pytest.raises(SystemExit):
        finetune.main(["--gradient_checkpointing", "sometimes", "--init_from", str(tmp_path / "none")])
    assert "invalid choice: 'sometimes' (choose from 'inherit', 'on', 'off')" in capsys.readouterr().err


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

# =============================================================================
# data.py: audio front end, catalogs, behaviour files, cache, datasets
# =============================================================================

def tone(seconds, sr=16000, freq=440.0, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_catalog(path, rows, header=("song_id", "audio", "title", "artists", "lyrics")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


# --- audio front end -------------------------------------------------------------------------

def test_120s_song_gives_1251_frames_and_30s_gives_313():
    rng = np.random.default_rng(0)
    assert data.log_mel(torch.from_numpy(rng.standard_normal(120 * 16000).astype(np.float32)), 16000).shape == (1251, 128)
    assert data.log_mel(torch.from_numpy(tone(30)), 16000).shape == (1 + 480000 // 1536, 128)


def reference_log_mel(x):
    """numpy reference: transformers' spectrogram with the same window, mel bank and power,
    then librosa-style power_to_db(ref=max, top_db=80) and per-song standardization."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function
    fb = mel_filter_bank(1025, 128, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
    S = spectrogram(x.astype(np.float64), window_function(2048, "hann", periodic=True), 2048, 1536,
                    power=2.0, center=True, pad_mode="constant", mel_filters=fb, mel_floor=1e-10,
                    dtype=np.float64).T
    db = 10 * np.log10(np.maximum(S, 1e-10)) - 10 * np.log10(max(S.max(), 1e-10))
    db = np.maximum(db, db.max() - 80.0)
    return (db - db.mean()) / (db.std() + 1e-8)


def test_log_mel_matches_transformers_spectrogram():
    rng = np.random.default_rng(1)
    t = np.arange(10 * 16000) / 16000
    x = (0.4 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 0.5 * t))
         + 0.05 * rng.standard_normal(t.size) * np.exp(-0.3 * t)).astype(np.float32)
    ours = data.log_mel(torch.from_numpy(x), 16000)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference_log_mel(x), atol=1e-4)


def test_log_mel_resamples_other_rates_first():
    import soxr
    x = tone(3, sr=22050, freq=1000.0)
    ref = reference_log_mel(soxr.resample(x, 22050, 16000))
    np.testing.assert_allclose(data.log_mel(torch.from_numpy(x), 22050).numpy(), ref, atol=1e-4)


def test_silent_and_nan_input_give_finite_output():
    silent = data.log_mel(torch.zeros(5 * 16000), 16000)
    assert torch.equal(silent, torch.zeros_like(silent))
    x = torch.from_numpy(tone(5))
    x[1000:1100] = float("nan")
    x[5] = float("inf")
    with pytest.warns(UserWarning, match="101 non-finite"):
        out = data.log_mel(x, 16000)
    assert torch.isfinite(out).all() and out.std() > 0.5


def test_load_audio_downmixes_stereo_and_resamples_44k(tmp_path):
    left, right = tone(2, sr=44100, amp=0.6), tone(2, sr=44100, amp=0.2)
    sf.write(tmp_path / "st.wav", np.stack([left, right], 1), 44100, subtype="FLOAT")
    x = data.load_audio(str(tmp_path / "st.wav"))
    assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 32000) <= 1
    expected = tone(2, sr=16000, amp=0.4)  # mean of the channels, sampled at 16 kHz
    np.testing.assert_allclose(x[2000:30000], expected[2000:30000], atol=2e-3)


def test_long_file_reads_only_the_first_max_seconds(tmp_path, monkeypatch):
    x = np.random.default_rng(2).uniform(-0.5, 0.5, 10 * 8000).astype(np.float32)
    sf.write(tmp_path / "long.wav", x, 8000, subtype="FLOAT")
    requested, read = [], sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        requested.append(frames)
        return read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    y = data.load_audio(str(tmp_path / "long.wav"), max_seconds=2)
    assert requested == [2 * 8000]  # a bounded read, not the whole file
    assert len(y) == 2 * 16000


def test_short_song_is_padded_to_min_frames_and_long_song_clipped_to_1251(tmp_path):
    sf.write(tmp_path / "short.wav", tone(0.5), 16000)
    sf.write(tmp_path / "long.wav", tone(125, sr=8000), 8000)
    assert data.song_mel(str(tmp_path / "short.wav")).shape == (data.MIN_FRAMES, 128)
    assert data.song_mel(str(tmp_path / "long.wav")).shape == (1251, 128)


# --- catalog and behaviour files -------------------------------------------------------------

def test_catalog_reads_csv_and_jsonl_and_builds_text(tmp_path):
    p = write_catalog(tmp_path / "c.csv", [["a", "x/a.wav", "T", "Ar", "la\nla"], ["b", "/abs/b.wav", "", "B", ""]],
                      header=("song_id", "audio", "title", "artists", "lyrics", "genre")[:5])
    cat = data.load_catalog(p)
    assert len(cat) == 2 and cat.index == {"a": 0, "b": 1}
    assert cat[0].audio == os.path.join(str(tmp_path), "x", "a.wav") and cat[1].audio == "/abs/b.wav"
    assert cat[0].text == "title: T; artists: Ar; lyrics: la\nla"
    with open(tmp_path / "c.jsonl", "w") as f:
        f.write(json.dumps({"song_id": "a", "audio": "a.wav", "title": "T", "artists": "", "lyrics": "", "genre": "rock"}) + "\n")
    cat = data.load_catalog(str(tmp_path / "c.jsonl"))
    assert cat[0].labels == {"genre": "rock"} and cat.rows_with("genre", "rock") == [0]


@pytest.mark.parametrize("case", ["missing_column", "duplicate", "empty_text", "non_utf8", "bad_json"])
def test_catalog_errors_name_file_and_row(tmp_path, case):
    p = str(tmp_path / "cat.csv")
    if case == "missing_column":
        write_catalog(p, [["a", "a.wav", "T", "A"]], header=("song_id", "audio", "title", "artists"))
        expect = ["cat.csv", "line 1", "lyrics"]
    elif case == "duplicate":
        write_catalog(p, [["a", "a.wav", "T", "", ""], ["b", "b.wav", "T", "", ""], ["a", "c.wav", "T", "", ""]])
        expect = ["cat.csv", "'a'", "row 0", "row 2", "song_id"]
    elif case == "empty_text":
        write_catalog(p, [["a", "a.wav", "T", "", ""], ["b", "b.wav", " ", "", ""]])
        expect = ["cat.csv", "row 1", "line 3", "title"]
    elif case == "non_utf8":
        with open(p, "wb") as f:
            f.write(b"song_id,audio,title,artists,lyrics\na,a.wav,T,,\nb,b.wav,Caf\xe9,,\n")
        expect = ["cat.csv", "line 3", "byte offset 58"]  # 35 header + 12 row bytes + len("b,b.wav,Caf")
    else:
        p = str(tmp_path / "cat.jsonl")
        with open(p, "w") as f:
            f.write('{"song_id": "a", "audio": "a.wav", "title": "T", "artists": "", "lyrics": ""}\n{"song_id": "b",\n')
        expect = ["cat.jsonl", "line 2", "malformed JSON"]
    with pytest.raises(CatalogError) as e:
        data.load_catalog(p)
    for s in expect:
        assert s in str(e.value), (s, str(e.value))


def test_split_rows_uses_split_column_or_seeded_90_10(tmp_path):
    rows = [[f"s{i}", f"{i}.wav", "t", "", ""] for i in range(50)]
    cat = data.load_catalog(write_catalog(tmp_path / "c.csv", rows))
    train, val = data.split_rows(cat, "train"), data.split_rows(cat, "val")
    assert len(val) == 5 and sorted(train + val) == list(range(50))
    assert data.split_rows(cat, "test") == [] and data.split_rows(cat, "val") == val
    cat = data.load_catalog(write_catalog(tmp_path / "d.csv", [r + [("train", "val", "test")[i % 3]] for i, r in enumerate(rows)],
                                          header=("song_id", "audio", "title", "artists", "lyrics", "split")))
    assert data.split_rows(cat, "test") == list(range(2, 50, 3))


def test_load_pairs_drops_unknown_ids_with_a_count_and_raises_when_none_left(tmp_path):
    cat = data.load_catalog(write_catalog(tmp_path / "c.csv", [[s, f"{s}.wav", "t", "", ""] for s in "abc"]))
    p = tmp_path / "pairs.csv"
    p.write_text("trigger_song_id,rec_song_id\na,b\na,zz\nyy,c\nc,a\n")
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 rows.*line 3: 'zz'.*line 4: 'yy'"):
        assert data.load_pairs(str(p), cat) == [(0, 1), (2, 0)]
    p.write_text("trigger_song_id,rec_song_id\nzz,a\n")
    with pytest.raises(CatalogError, match="pairs.csv: no usable pairs"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.load_pairs(str(p), cat)
    p.write_text("trigger,rec_song_id\na,b\n")
    with pytest.raises(CatalogError, match="pairs.csv: line 1.*trigger_song_id"):
        data.load_pairs(str(p), cat)


def test_favourites_sorted_by_user_then_time_and_bad_timestamp_named(tmp_path):
    cat = data.load_catalog(write_catalog(tmp_path / "c.csv", [[s, f"{s}.wav", "t", "", ""] for s in "abc"]))
    p = tmp_path / "fav.csv"
    p.write_text("user_id,song_id,timestamp\nu2,a,5\nu1,c,20\nu1,b,2024-01-01T00:00:00\nu1,zz,1\nu1,a,10\n")
    with pytest.warns(UserWarning, match="dropped 1 of 5"):
        favs = data.load_favourites(str(p), cat)
    assert [(u, r) for u, r, _ in favs] == [("u1", 0), ("u1", 2), ("u1", 1), ("u2", 0)]
    p.write_text("user_id,song_id,timestamp\nu1,a,1\nu1,b,yesterday\n")
    with pytest.raises(CatalogError, match="fav.csv: line 3 .*timestamp"):
        data.load_favourites(str(p), cat)


def test_cooccurrence_pairs_match_hand_worked_log():
    favs = [("u1", 0, 1.0), ("u1", 1, 2.0), ("u1", 2, 3.0), ("u1", 3, 4.0),
            ("u2", 1, 1.0), ("u2", 0, 2.0), ("u2", 4, 3.0),
            ("u3", 5, 1.0), ("u3", 5, 2.0), ("u3", 6, 3.0)]
    # window 3: u1 [0,1,2,3] -> 01 02 12 13 23; u2 [1,0,4] -> 10 (= 01, dropped) 14 04; u3 [5,5,6] -> 56 (55 is a self pair)
    assert data.mine_cooccurrence_pairs(favs, window=3) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (1, 4), (0, 4), (5, 6)]
    # window 2 = consecutive favourites only
    assert data.mine_cooccurrence_pairs(favs, window=2) == [(0, 1), (1, 2), (2, 3), (0, 4), (5, 6)]
    # Per-user cap: users whose pairs do not overlap, so the cap is the only thing that removes pairs.
    # window 3: u1 [0,1,2,3] -> 5 pairs, u2 [4,5,6] -> 3 pairs, u3 [7,8] -> 1 pair.
    disjoint = [("u1", r, float(t)) for t, r in enumerate([0, 1, 2, 3])] + \
               [("u2", r, float(t)) for t, r in enumerate([4, 5, 6])] + [("u3", 7, 0.0), ("u3", 8, 1.0)]
    full = data.mine_cooccurrence_pairs(disjoint, window=3)
    by_user = {"u1": full[:5], "u2": full[5:8], "u3": full[8:]}
    assert by_user["u3"] == [(7, 8)]
    for cap in (1, 2, 3):
        capped = data.mine_cooccurrence_pairs(disjoint, window=3, max_pairs_per_user=cap)
        for user, pairs in by_user.items():
            mine = [p for p in capped if p in pairs]
            # exactly min(cap, the user's pairs) remain, each a real pair, in the user's time order
            assert len(mine) == min(cap, len(pairs)) and mine == [p for p in pairs if p in mine], (cap, user, capped)
        assert len(capped) == sum(min(cap, len(p)) for p in by_user.values())
    assert data.mine_cooccurrence_pairs(disjoint, window=3, max_pairs_per_user=5) == full  # cap not reached
    assert data.mine_cooccurrence_pairs(disjoint, window=3, max_pairs_per_user=2) == \
        data.mine_cooccurrence_pairs(disjoint, window=3, max_pairs_per_user=2)  # seeded


# --- cache, datasets, collator ---------------------------------------------------------------

def test_prepare_in_two_shards_round_trips_resumes_and_reports_bad_files(tmp_path, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(3)
    sf.write(audio / "a.wav", tone(3.0), 16000)
    sf.write(audio / "b.flac", np.stack([tone(2.0, sr=22050), tone(2.0, sr=22050, freq=660)], 1), 22050)
    sf.write(audio / "c.wav", tone(0.4, freq=200), 16000)  # shorter than MIN_FRAMES
    (audio / "d.wav").write_bytes(b"RIFF not really a wav file")
    sf.write(audio / "e.wav", rng.uniform(-0.3, 0.3, 4 * 16000).astype(np.float32), 16000)
    rows = [[s, f"audio/{f}", f"song {s}", "artist", ""] for s, f in
            zip("abcde", ["a.wav", "b.flac", "c.wav", "d.wav", "e.wav"])]
    cat_path = write_catalog(tmp_path / "cat.csv", rows)
    cat, cache_dir = data.load_catalog(cat_path), str(tmp_path / "cache")

    data.main(["prepare", "--catalog", cat_path, "--cache", cache_dir, "--shard", "0/2"])  # rows 0-1
    with pytest.raises(CatalogError, match=r"shard 1/2 missing: .*--shard 1/2"):
        data.MelCache.open(cache_dir, cat)
    counts = data.prepare(cat_path, cache_dir, shard=(1, 2), num_workers=2, max_bad=0.5)  # rows 2-4, d fails
    assert counts == {**counts, "rows": 3, "computed": 2, "failed": 1, "kept": 0}
    with open(os.path.join(cache_dir, "bad-00001-of-00002.csv")) as f:
        bad = list(csv.DictReader(f))
    assert [b["song_id"] for b in bad] == ["d"] and bad[0]["path"].endswith("d.wav")

    cache = data.MelCache.open(cache_dir, cat)
    assert [cache.has(r) for r in range(5)] == [True, True, True, False, True]
    for r in (0, 1, 2, 4):
        np.testing.assert_allclose(cache.mel(r).numpy(), data.song_mel(cat[r].audio).numpy(), atol=5e-3)
    assert cache.mel(2).shape == (data.MIN_FRAMES, 128)

    again = data.prepare(cat_path, cache_dir, shard=(1, 2), max_bad=0.5)  # done rows are kept, the failure is retried
    assert (again["kept"], again["computed"], again["failed"]) == (2, 0, 1)
    assert "1 failed" in capsys.readouterr().out

    # a cache built for another catalog is refused
    other = data.load_catalog(write_catalog(tmp_path / "other.csv", rows[:4] + [["e", "audio/x.wav", "t", "", ""]]))
    with pytest.raises(CatalogError, match="another catalog"):
        data.MelCache.open(cache_dir, other)

    # the datasets skip the failed song and its pairs; the collator batches what is left
    from transformers import BertTokenizer
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "title", "artists", "lyrics", ":", ";", "song", "artist"] + list("abcde"))})
    collate = data.Collator(tok)
    with pytest.warns(UserWarning, match="skipping 1 songs"):
        songs = data.SongDataset(cat, list(range(5)), cache)
    assert len(songs) == 4
    batch = collate([songs[k] for k in range(4)])
    assert batch["mel"].shape == (4, 1 + 4 * 16000 // 1536, 128)  # e.wav, 4 s, is the longest
    assert batch["row"].tolist() == [0, 1, 2, 4]  # catalog rows, the failed d (row 3) left out
    with pytest.warns(UserWarning):
        pairs = data.PairDataset(cat, [(0, 1), (3, 0), (4, 2)], cache)
    assert pairs.pairs == [(0, 1), (4, 2)]
    assert torch.equal(pairs[1]["rec_mel"], cache.mel(2))
    no_cache = data.SongDataset(cat, [0])
    np.testing.assert_allclose(no_cache[0]["mel"].numpy(), cache.mel(0).numpy(), atol=5e-3)


def test_collator_tokenizes_exactly_as_the_tokenizer_call():
    """Collator.tokenize drives the Rust backend directly; the reference is the wrapper's own call."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_BERT)
    catalog = data.load_catalog(os.path.join(SAMPLE, "catalog.csv"))
    texts = [catalog[r].text for r in range(40)]
    long = [" ".join([t] * 40) for t in texts[:5]]  # > 512 tokens: truncated, [SEP] kept
    for max_len, batch in ((512, texts), (512, long + texts[:3]), (16, texts[:7]), (512, texts[:1])):
        ours = data.Collator(tok, max_len).tokenize(batch)
        ref = tok(batch, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        assert set(ours) == set(ref) == set(tok.model_input_names)
        for k in ref:
            assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), (max_len, k)
    assert ours["input_ids"].shape[1] < 512  # one text: no padding at all
    assert data.Collator(tok, 512).tokenize(long)["input_ids"].shape == (5, 512)
    left = AutoTokenizer.from_pretrained(TINY_BERT, padding_side="left", truncation_side="left")
    ref = left(long[:1] + texts[:3], padding="longest", truncation=True, max_length=64, return_tensors="pt")
    ours = data.Collator(left, 64).tokenize(long[:1] + texts[:3])
    assert all(torch.equal(ours[k], ref[k]) for k in ref) and ref["attention_mask"][1, 0] == 0
    # the caller's tokenizer is not reconfigured: its own calls still pad and truncate as asked
    assert tok(long[0])["input_ids"].__len__() > 512 and tok.backend_tokenizer.truncation is None


def test_collator_pads_mels_with_masks_and_tokenizes_texts():
    from transformers import BertTokenizer
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", "y"])})
    collate = data.Collator(tok, max_text_length=6)
    mels = [torch.randn(n, 128) for n in (20, 31, 5)]
    batch = collate([{"mel": m, "text": t, "row": r} for m, t, r in zip(mels, ["x", "x y x y x y x y", "y"], [7, 8, 9])])
    assert set(batch) == {"mel", "padding_mask", "tokens", "row"}
    assert batch["mel"].shape == (3, 31, 128) and batch["mel"].dtype == torch.float32
    assert batch["padding_mask"].sum(1).tolist() == [11, 0, 26] and batch["padding_mask"][0, 19:21].tolist() == [False, True]
    assert torch.equal(batch["mel"][2, :5], mels[2]) and batch["mel"][2, 5:].abs().sum() == 0
    assert batch["tokens"]["input_ids"].shape == (3, 6)  # the long text is truncated at 6
    assert batch["tokens"]["attention_mask"].sum(1).tolist() == [3, 6, 3]
    assert batch["row"].dtype == torch.long and batch["row"].tolist() == [7, 8, 9]
    short = collate([{"trig_mel": torch.randn(4, 128), "rec_mel": torch.randn(6, 128), "trig_text": "x",
                      "rec_text": "y", "trig_row": 0, "rec_row": 1}])
    assert set(short) == {"trig_mel", "trig_padding_mask", "rec_mel", "rec_padding_mask",
                          "trig_tokens", "rec_tokens", "trig_row", "rec_row"}
    assert short["trig_mel"].shape == (1, data.MIN_FRAMES, 128) and short["trig_padding_mask"].sum() == data.MIN_FRAMES - 4


# --- synthetic world ---------------------------------------------------------------------------

def test_synth_is_deterministic_and_loads(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        world_gen.make_world(out, songs=14, users=3, seed=11, artists=6, max_pairs=50)
    for name in ["catalog.csv", "favourites.csv", "pairs.csv", "impressions.csv", "artist_graph.csv",
                 "artist_split.csv", "tiny-bert/tokenizer.json", "tiny-bert/tokenizer_config.json",
                 "tiny-bert/config.json"]:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    cat = data.load_catalog(os.path.join(a, "catalog.csv"))
    for song in cat.songs:
        assert filecmp.cmp(song.audio, song.audio.replace(a, b), shallow=False), song.audio
        assert song.labels["hidden_factor"] not in song.text  # the hidden factor is never written
    favs = data.load_favourites(os.path.join(a, "favourites.csv"), cat)
    assert len(favs) == 3 * 13  # 35-60 favourites, capped at songs - 1 for this tiny world
    train = set(data.split_rows(cat, "train"))
    pairs = data.load_pairs(os.path.join(a, "pairs.csv"), cat)
    assert all(t in train and r in train for t, r in pairs)
    # pairs are the similar-songs channel's (trigger = the previous favourite, favourite): some of
    # the consecutive favourites, never a pair of non-consecutive ones
    by_user = {}
    for user, row, _ in favs:  # sorted by user, then time
        by_user.setdefault(user, []).append(row)
    consecutive = {(seq[i], seq[i + 1]) for seq in by_user.values() for i in range(len(seq) - 1)}
    assert set(pairs) <= consecutive and pairs
    assert len(pairs) < len({(t, r) for t, r in consecutive if t in train and r in train})  # ~half: one channel
    from transformers import AutoConfig, AutoTokenizer
    tok, cfg = AutoTokenizer.from_pretrained(os.path.join(a, "tiny-bert")), AutoConfig.from_pretrained(os.path.join(a, "tiny-bert"))
    assert cfg.vocab_size == len(tok) and cfg.hidden_size == 64
    assert tok.unk_token_id not in tok(cat[0].text)["input_ids"]


def test_cli_mine_pairs_writes_song_ids_and_typos_fail(tmp_path):
    write_catalog(tmp_path / "c.csv", [[s, f"{s}.wav", "t", "", "", sp] for s, sp in zip("abcde", ["train"] * 4 + ["test"])],
                  header=("song_id", "audio", "title", "artists", "lyrics", "split"))
    (tmp_path / "fav.csv").write_text("user_id,song_id,timestamp\nu1,a,1\nu1,b,2\nu1,e,3\nu1,c,4\nu2,d,1\nu2,a,2\n")
    args = ["mine-pairs", "--favourites", str(tmp_path / "fav.csv"), "--catalog", str(tmp_path / "c.csv"),
            "--out", str(tmp_path / "p.csv"), "--window", "3"]
    data.main(args)
    # u1 a b e c: ab ae be bc ec -> without test song e: ab bc; u2 d a: da
    assert (tmp_path / "p.csv").read_text() == "trigger_song_id,rec_song_id\na,b\nb,c\nd,a\n"
    for bad in (["mine-pair"] + args[1:], args + ["--windw", "2"], ["prepare", "--catalog", "c", "--cache", "d", "--shard", "2/2"]):
        with pytest.raises(SystemExit):
            data.main(bad)


# =============================================================================
# data.py fault tolerance: bad audio, bad files, killed prepare, security
# =============================================================================

def tones(seconds, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32)


def music(seconds=3.0, sr=16000):
    """Tones over broadband noise: every mel bin well above 8-bit quantization noise (-48 dBFS)."""
    noise = np.random.default_rng(1).uniform(-0.2, 0.2, int(seconds * sr)).astype(np.float32)
    return 0.6 * (tones(seconds, sr) + noise)


def read_report(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tokenizer():
    from transformers import BertTokenizer
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "title", "artists", "lyrics", ":", ";"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words + list("abcdefghijklmnopqrstuvwxyz"))})


# --- bad audio: each kind through song_mel and through prepare --------------------------------
#
# A case writes its file to `path` (or leaves it missing) and says what must happen:
#   ("bad", text): song_mel raises, prepare skips the song and reports it with `text` in the reason
#   ("ok", check): song_mel and prepare both give a finite mel; check(mel, tmp_path) compares it

def _wav_bytes(tmp_path, x, sr=16000, subtype="PCM_16"):
    sf.write(tmp_path / "src.wav", x, sr, subtype=subtype)
    return (tmp_path / "src.wav").read_bytes()


def _flac_bytes(tmp_path):
    sf.write(tmp_path / "src.flac", music(3.0), 16000)
    return (tmp_path / "src.flac").read_bytes()


def _close_to(reference, max_abs=None, mean_abs=None, skip_edge_frames=0):
    """check(): the mel is near the reference waveform's (16 kHz, PCM_16 or float)."""
    def check(mel, tmp_path):
        ref = data.log_mel(torch.from_numpy(reference), 16000).numpy()
        assert mel.shape == ref.shape
        err = np.abs(mel.numpy() - ref)
        if skip_edge_frames:  # the resampler's filter transient sits in the first/last frame
            err = err[skip_edge_frames:-skip_edge_frames]
        if max_abs is not None:
            assert err.max() < max_abs, err.max()
        if mean_abs is not None:
            assert err.mean() < mean_abs, err.mean()
    return check


def _silent(mel, tmp_path):
    assert torch.count_nonzero(mel) == 0  # the -80 dB floor everywhere, standardized to 0, not NaN


def _nan_inf(mel, tmp_path):
    clean = music(3.0)
    clean[[100, 5000, 20000]] = 0.0  # the non-finite samples become 0
    _close_to(clean, max_abs=1e-4)(mel, tmp_path)


def _one_second(mel, tmp_path):
    assert mel.shape == (data.MIN_FRAMES, 128)  # 1 s = 11 frames, padded with silence to 17


def _truncated_data(mel, tmp_path):
    assert mel.shape == (1 + 32000 // data.HOP_LENGTH, 128)  # the 2 s that are there


def _write_case(case, path, tmp_path):
    """Write the file for `case` at `path`; return its expectation."""
    if case == "truncated_header":
        path.write_bytes(_wav_bytes(tmp_path, music(1.0))[:30])
        return "bad", "No 'data' chunk"
    if case == "truncated_flac":
        b = _flac_bytes(tmp_path)
        path.write_bytes(b[: len(b) // 3])
        return "bad", "flac decoder lost sync"
    if case == "corrupt_flac":  # 2000 zeroed bytes in the middle of the stream
        b = bytearray(_flac_bytes(tmp_path))
        b[len(b) // 2: len(b) // 2 + 2000] = bytes(2000)
        path.write_bytes(bytes(b))
        return "bad", "flac decoder"
    if case == "truncated_wav_data":  # header promises 4 s, 2 s present: the rest is just absent
        b = _wav_bytes(tmp_path, music(4.0))
        path.write_bytes(b[: 44 + 2 * 32000])
        return "ok", _truncated_data
    if case == "header_only_wav":
        path.write_bytes(_wav_bytes(tmp_path, music(1.0))[:44])
        return "bad", "no audio frames"
    if case == "zero_length":
        path.write_bytes(b"")
        return "bad", "empty file (0 bytes)"
    if case == "missing":
        return "bad", "FileNotFoundError"
    if case == "directory":
        path.mkdir()
        return "bad", "not a regular file"
    if case == "unreadable_chmod":
        if os.geteuid() == 0:
            pytest.skip("running as root, which reads a chmod 000 file anyway; 'unreadable_simulated' covers it")
        sf.write(path, music(1.0), 16000, format="WAV")
        os.chmod(path, 0)
        return "bad", "PermissionError"
    if case == "random_bytes_xyz":  # no 0xFF byte, so no MP3 frame sync can be found by chance
        path.write_bytes(bytes(np.random.default_rng(1).integers(0, 255, 5000).astype(np.uint8)))
        return "bad", "Format not recognised"
    if case == "text_as_wav":
        path.write_text("song_id,title\nnot,audio\n" * 20)
        return "bad", "Format not recognised"
    if case == "silent":
        sf.write(path, np.zeros(3 * 16000, np.float32), 16000, format="WAV")
        return "ok", _silent
    if case == "nan_inf":
        x = music(3.0)
        x[[100, 5000, 20000]] = [np.nan, np.inf, -np.inf]
        sf.write(path, x, 16000, format="WAV", subtype="FLOAT")
        return "ok", _nan_inf
    if case in ("pcm_u8", "pcm_24", "float32"):
        subtype = {"pcm_u8": "PCM_U8", "pcm_24": "PCM_24", "float32": "FLOAT"}[case]
        sf.write(path, music(3.0), 16000, format="WAV", subtype=subtype)
        sf.write(tmp_path / "ref16.wav", music(3.0), 16000, subtype="PCM_16")
        ref16 = data.load_audio(str(tmp_path / "ref16.wav"))
        # 8-bit has its own noise floor 48 dB down, so only the average may move; 24-bit and float
        # differ from 16-bit by 16-bit's rounding alone
        return "ok", _close_to(ref16, mean_abs=0.03) if case == "pcm_u8" else _close_to(ref16, max_abs=0.005)
    if case in ("stereo", "six_channels"):
        ch = 2 if case == "stereo" else 6
        gains = np.linspace(0.5, 1.5, ch, dtype=np.float32)  # mean gain 1: the downmix is music()
        sf.write(path, music(3.0)[:, None] * gains, 16000, format="WAV", subtype="FLOAT")
        return "ok", _close_to(music(3.0), max_abs=1e-3)
    if case in ("8khz", "48khz"):
        sr = 8000 if case == "8khz" else 48000
        sf.write(path, tones(3.0, sr), sr, format="WAV", subtype="FLOAT")  # both tones < 4 kHz
        return "ok", _close_to(tones(3.0), max_abs=0.02, skip_edge_frames=1)
    if case == "one_second":
        sf.write(path, music(1.0), 16000, format="WAV")
        return "ok", _one_second
    raise AssertionError(case)


AUDIO_CASES = ["truncated_header", "truncated_flac", "corrupt_flac", "truncated_wav_data", "header_only_wav",
               "zero_length", "missing", "directory", "unreadable_chmod", "unreadable_simulated",
               "random_bytes_xyz", "text_as_wav", "silent", "nan_inf", "pcm_u8", "pcm_24", "float32",
               "stereo", "six_channels", "8khz", "48khz", "one_second"]


@pytest.mark.parametrize("case", AUDIO_CASES)
def test_bad_audio_is_skipped_and_reported_and_odd_audio_decodes(tmp_path, monkeypatch, case):
    ext = {"random_bytes_xyz": ".xyz", "truncated_flac": ".flac", "corrupt_flac": ".flac"}.get(case, ".wav")
    path = tmp_path / f"x{ext}"
    if case == "unreadable_simulated":
        # as root a chmod 000 file stays readable, so make open() of this one path fail the way it
        # does for a normal user; this checks that data.py opens the file itself (not libsndfile)
        # and that the OS's PermissionError becomes a reported skip, not a crash
        sf.write(path, music(1.0), 16000, format="WAV")
        real_open = open

        def open_denied(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(data, "open", open_denied, raising=False)
        kind, expect = "bad", "PermissionError"
    else:
        kind, expect = _write_case(case, path, tmp_path)

    # song_mel directly
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "bad":
            with pytest.raises((AudioError, OSError)) as e:
                data.song_mel(str(path))
            assert expect in f"{type(e.value).__name__}: {e.value}"
        else:
            mel = data.song_mel(str(path))
            assert torch.isfinite(mel).all()
            expect(mel, tmp_path)
    if case == "nan_inf":
        assert any("3 non-finite samples replaced with 0" in str(w.message) for w in caught)

    # through prepare: a good song and this one; the run goes on whatever this one is
    sf.write(tmp_path / "good.wav", music(2.0), 16000)
    cat_path = write_catalog(tmp_path / "cat.csv", [["good", "good.wav", "Good", "A", ""],
                                                    ["x", path.name, "X", "B", ""]])
    cache_dir = str(tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the NaN warning, already checked above
        counts = data.prepare(cat_path, cache_dir, max_bad=1.0)
    cat = data.load_catalog(cat_path)
    report = os.path.join(cache_dir, "bad-00000-of-00001.csv")
    if kind == "bad":
        assert (counts["computed"], counts["failed"], counts["report"]) == (1, 1, report)
        (row,) = read_report(report)
        assert row["song_id"] == "x" and row["path"] == str(path) and expect in row["reason"], row
        assert not data.MelCache.open(cache_dir, cat).has(1)
    else:
        assert (counts["computed"], counts["failed"]) == (2, 0) and not os.path.exists(report)
        cache = data.MelCache.open(cache_dir, cat)
        mel = cache.mel(1)
        assert torch.isfinite(mel).all()
        np.testing.assert_allclose(mel.numpy(), data.song_mel(str(path)).numpy(), atol=5e-3)  # float16 slot


def test_prepare_fails_only_over_max_bad_and_names_the_report(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", music(1.0), 16000)
    rows = [[f"s{i}", "a.wav", "t", "", ""] for i in range(9)] + [["bad", "nope.wav", "t", "", ""]]
    cat_path, cache_dir = write_catalog(tmp_path / "cat.csv", rows), str(tmp_path / "cache")
    report = os.path.join(cache_dir, "bad-00000-of-00001.csv")
    with pytest.raises(data.TooManyBadFiles) as e:  # 1 of 10 = 10% > 5%
        data.prepare(cat_path, cache_dir, max_bad=0.05)
    assert str(e.value).startswith(report) and "1 of 10 songs (10.0%)" in str(e.value)
    assert e.value.counts["computed"] == 9  # the good songs were saved before the error
    out = capsys.readouterr().out
    assert "9 computed, 0 kept from an earlier run, 1 failed (10.0%, max-bad 5.0%; see " + report in out
    counts = data.prepare(cat_path, cache_dir, max_bad=0.1)  # 10% is not over 10%: no error
    assert (counts["kept"], counts["computed"], counts["failed"]) == (9, 0, 1)

    # the command line: exit status 1 at the default 1%, 0 with --max-bad 0.5; the message names the report
    cmd = [sys.executable, os.path.join(ROOT, "data.py"), "prepare", "--catalog", cat_path, "--cache", cache_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 1 and f"error: {report}: 1 of 10 songs (10.0%)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["--max-bad", "0.5"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "1 failed (10.0%, max-bad 50.0%" in r.stdout, r.stderr[-2000:]


def test_20_minute_song_decodes_only_the_first_120_s(tmp_path):
    """Peak RSS of a process running song_mel on a 20-minute 48 kHz stereo WAV, against one running
    it on a 1 s file (imports, mel bank): the difference is what decoding costs."""
    big, small = tmp_path / "long.wav", tmp_path / "short.wav"
    sr, minutes = 48000, 20
    # a 16-bit stereo WAV written by hand: 130 s of tones, then a sparse tail of zeros (silence),
    # so the shared machine's disk is spared 200 MB of writes; the reader cannot tell the difference
    frames = minutes * 60 * sr
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + 4 * frames, b"WAVE", b"fmt ", 16, 1, 2, sr,
                         4 * sr, 4, 16, b"data", 4 * frames)
    head = (tones(130, sr) * 32767).astype("<i2")
    with open(big, "wb") as f:
        f.write(header + np.stack([head, head], 1).tobytes())
        f.truncate(len(header) + 4 * frames)
    assert sf.info(str(big)).frames == frames and sf.info(str(big)).channels == 2
    sf.write(small, music(1.0), 16000)
    size = os.path.getsize(big)
    full_decode = minutes * 60 * sr * 2 * 4  # float32 (frames, 2): what reading it all would hold
    # a driver process runs the two children one after the other, so RUSAGE_CHILDREN after each is
    # that child's peak (ru_maxrss is a max over children; the driver has no others)
    child = ("import sys, data; m = data.song_mel(sys.argv[1]); "
             "assert tuple(m.shape) in ((17, 128), (1251, 128)), m.shape")
    driver = (f"import json, resource, subprocess, sys\n"
              f"out = []\n"
              f"for p in sys.argv[1:]:\n"
              f"    subprocess.run([sys.executable, '-c', {child!r}, p], check=True, cwd={ROOT!r})\n"
              f"    out.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
              f"print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", driver, str(small), str(big)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    base, peak = json.loads(r.stdout.strip().splitlines()[-1])
    extra = peak - base
    print(f"\n20-min 48 kHz stereo WAV: file {size / 2**20:.0f} MiB; whole-file float32 decode would be "
          f"{full_decode / 2**20:.0f} MiB; song_mel peak RSS {peak / 2**20:.0f} MiB, "
          f"{extra / 2**20:.0f} MiB over a 1 s song ({base / 2**20:.0f} MiB)")
    assert extra < 0.3 * full_decode and extra < size


# --- resume and interruption ----------------------------------------------------------------

def test_resume_recomputes_only_rows_not_done_and_leaves_kept_slots_alone(tmp_path):
    rows = []
    for k in range(6):
        sf.write(tmp_path / f"{k}.wav", music(1.0 + 0.3 * k), 16000)
        rows.append([f"s{k}", f"{k}.wav", "t", "", ""])
    cat_path, cache_dir = write_catalog(tmp_path / "cat.csv", rows), str(tmp_path / "cache")
    assert data.prepare(cat_path, cache_dir)["computed"] == 6
    mel_path, len_path = (os.path.join(cache_dir, f"{k}-00000-of-00001.npy") for k in ("mel", "len"))
    # mark rows 1 and 4 not done; stamp a marker into every kept slot, which a recompute would overwrite
    lengths = np.load(len_path, allow_pickle=False)
    true_lengths = lengths.copy()
    lengths[[1, 4]] = data.NOT_DONE
    np.save(len_path, lengths)
    mels = np.lib.format.open_memmap(mel_path, mode="r+")
    mels[[0, 2, 3, 5]] = 7.0
    mels[[1, 4]] = np.nan
    mels.flush()
    kept_bytes = np.array(mels[[0, 2, 3, 5]]).tobytes()
    del mels

    counts = data.prepare(cat_path, cache_dir)
    assert (counts["kept"], counts["computed"], counts["failed"]) == (4, 2, 0)
    mels = np.load(mel_path, mmap_mode="r", allow_pickle=False)
    assert np.array(mels[[0, 2, 3, 5]]).tobytes() == kept_bytes  # untouched
    np.testing.assert_array_equal(np.load(len_path, allow_pickle=False), true_lengths)
    cache = data.MelCache.open(cache_dir, data.load_catalog(cat_path))
    for r in (1, 4):
        np.testing.assert_allclose(cache.mel(r).numpy(), data.song_mel(str(tmp_path / f"{r}.wav")).numpy(), atol=5e-3)


def test_prepare_killed_mid_run_resumes_to_a_complete_correct_cache(tmp_path):
    n = 200
    for k in range(n):
        sf.write(tmp_path / f"{k}.wav", tones(0.5 + 0.01 * k), 16000)
    cat_path = write_catalog(tmp_path / "cat.csv", [[f"s{k}", f"{k}.wav", "t", "", ""] for k in range(n)])
    cache_dir = str(tmp_path / "cache")
    len_path = os.path.join(cache_dir, "len-00000-of-00001.npy")
    # the child flushes often and takes >= 25 ms a song, so there is a window to kill it mid-run;
    # the kill itself is a real SIGKILL: no cleanup code runs
    child = ("import sys, time, data\n"
             "data.FLUSH_SECONDS = 0.05\n"
             "decode = data.song_mel\n"
             "data.song_mel = lambda p: (time.sleep(0.025), decode(p))[1]\n"
             "data.prepare(sys.argv[1], sys.argv[2])\n")
    proc = subprocess.Popen([sys.executable, "-c", child, cat_path, cache_dir], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline, done_at_kill = time.time() + 60, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(len_path):
                done_at_kill = int((np.load(len_path, allow_pickle=False) >= 0).sum())
                if done_at_kill >= 5:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    lengths = np.load(len_path, allow_pickle=False)
    done = int((lengths >= 0).sum())
    assert 5 <= done < n, done  # killed part way: some rows declared done, some not

    counts = data.prepare(cat_path, cache_dir)
    assert counts["kept"] == done and counts["computed"] == n - done and counts["failed"] == 0
    cat = data.load_catalog(cat_path)
    cache = data.MelCache.open(cache_dir, cat)  # refuses an unfinished cache, so this says: all done
    for r in range(n):
        np.testing.assert_allclose(cache.mel(r).numpy(), data.song_mel(cat[r].audio).numpy(), atol=5e-3)


# --- training straight from audio (no cache) -------------------------------------------------

def _catalog_with_bad_audio(tmp_path):
    sf.write(tmp_path / "a.wav", music(2.0), 16000)
    sf.write(tmp_path / "c.wav", music(1.5), 16000)
    (tmp_path / "d.wav").write_bytes(b"RIFF\x00\x00 definitely not audio")
    rows = [["a", "a.wav", "a", "", ""], ["b", "missing.wav", "b", "", ""],
            ["c", "c.wav", "c", "", ""], ["d", "d.wav", "d", "", ""]]
    return data.load_catalog(write_catalog(tmp_path / "cat.csv", rows))


def test_dataloader_worker_skips_undecodable_songs_with_a_count(tmp_path, capfd):
    cat = _catalog_with_bad_audio(tmp_path)
    # a spawned worker: a forked one would inherit pytest's warning recorder instead of printing
    # to stderr as it does in a training run
    loader = torch.utils.data.DataLoader(data.SongDataset(cat, [0, 1, 2, 3], on_error="skip"), batch_size=4,
                                         num_workers=1, collate_fn=data.Collator(tokenizer()),
                                         multiprocessing_context="spawn")
    (batch,) = list(loader)
    assert batch["row"].tolist() == [0, 2] and batch["mel"].shape[0] == 2
    err = capfd.readouterr().err  # the worker's warnings, on its stderr
    assert "skipping" in err and "row 1 (song 'b')" in err and "FileNotFoundError" in err
    assert "row 3 (song 'd')" in err and "dropped 2 of 4 items" in err and "2 dropped so far" in err

    # pairs: a pair with a bad song is dropped as a whole
    pairs = data.PairDataset(cat, [(0, 2), (1, 0), (2, 3)], on_error="skip")
    collate = data.Collator(tokenizer())
    with pytest.warns(UserWarning, match="dropped 2 of 3 items"):
        batch = collate([pairs[k] for k in range(3)])
    assert batch["trig_row"].tolist() == [0] and batch["rec_row"].tolist() == [2] and collate.skipped == 2
    with pytest.raises(AudioError, match="all 1 songs of this batch failed"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        collate([pairs[1]])


def test_dataloader_worker_raise_mode_names_the_catalog_row_not_a_bare_decoder_error(tmp_path):
    cat = _catalog_with_bad_audio(tmp_path)
    loader = torch.utils.data.DataLoader(data.SongDataset(cat, [0, 1]), batch_size=2, num_workers=1,
                                         collate_fn=data.Collator(tokenizer()))
    with pytest.raises(CatalogError) as e:  # re-raised in the main process with its type kept
        list(loader)
    msg = str(e.value)
    assert "cat.csv: row 1 (song 'b'), column 'audio'" in msg and "missing.wav" in msg and "FileNotFoundError" in msg
    with pytest.raises(ValueError, match="on_error"):
        data.SongDataset(cat, [0], on_error="ignore")


# --- bad catalogs, pair files, user logs -----------------------------------------------------

def _catalog3(tmp_path):
    return data.load_catalog(write_catalog(tmp_path / "c.csv", [[s, f"{s}.wav", "t", "", ""] for s in "abc"]))


CATALOG_CASES = {
    # case: (file name, bytes, substrings the CatalogError must contain: file, line/row, column)
    "missing_column": ("cat.csv", b"song_id,audio,title,artists\na,a.wav,T,A\n",
                       ["cat.csv", "line 1 (header)", "lyrics"]),
    "duplicate_song_id": ("cat.csv", b"song_id,audio,title,artists,lyrics\na,a.wav,T,,\nb,b.wav,T,,\na,c.wav,T,,\n",
                          ["cat.csv", "'a'", "row 0 (line 2)", "row 2 (line 4)", "column 'song_id'"]),
    "no_text": ("cat.csv", b"song_id,audio,title,artists,lyrics\na,a.wav,T,,\nb,b.wav, , ,\n",
                ["cat.csv", "line 3 (row 1)", "'title', 'artists', 'lyrics'", "'b'"]),
    "non_utf8": ("cat.csv", b"song_id,audio,title,artists,lyrics\na,a.wav,T,,\nb,b.wav,Caf\xe9,,\n",
                 ["cat.csv", "line 3 (row 1), column 'title'", "byte offset 58", "\\xe9"]),
    "non_utf8_header": ("cat.csv", b"song_id,audio,title,artists,lyrics,g\xe9nre\na,a.wav,T,,,x\n",
                        ["cat.csv", "line 1 (header)", "byte offset 36"]),
    "non_utf8_jsonl": ("cat.jsonl",
                       b'{"song_id": "a", "audio": "a.wav", "title": "T", "artists": "", "lyrics": "\xff"}\n',
                       ["cat.jsonl", "line 1 (row 0), column 'lyrics'"]),
    "too_many_fields": ("cat.csv", b"song_id,audio,title,artists,lyrics\na,a.wav,Hello, world,,\n",
                        ["cat.csv", "line 2 (row 0)", "6 fields"]),
    "runaway_quote": ("cat.csv", b'song_id,audio,title,artists,lyrics\na,a.wav,"T,,\n' + b"x" * 140_000 + b"\n",
                      ["cat.csv", "line 2 (row 0)", "field larger than field limit", "quote"]),
    "empty_audio": ("cat.csv", b"song_id,audio,title,artists,lyrics\na,,T,,\n",
                    ["cat.csv", "line 2 (row 0)", "column 'audio'"]),
    "empty_file": ("cat.csv", b"", ["cat.csv", "empty"]),
}


@pytest.mark.parametrize("case", list(CATALOG_CASES))
def test_bad_catalog_raises_catalog_error_naming_file_row_and_column(tmp_path, case):
    name, content, expect = CATALOG_CASES[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CatalogError) as e:
        data.load_catalog(str(tmp_path / name))
    for s in expect:
        assert s in str(e.value), (s, str(e.value))


def test_pairs_naming_unknown_songs_are_dropped_with_a_counted_warning_naming_the_file(tmp_path):
    cat = _catalog3(tmp_path)
    p = tmp_path / "pairs.csv"
    p.write_text("trigger_song_id,rec_song_id\na,b\na,zz\nyy,c\n")
    with pytest.warns(UserWarning, match=r"pairs.csv: dropped 2 of 3 rows naming a song not in the catalog"):
        assert data.load_pairs(str(p), cat) == [(0, 1)]


@pytest.mark.parametrize("content,expect", [
    ("trigger_song_id,rec_song_id\nzz,a\nb,yy\n", "pairs.csv: no usable pairs (2 rows, 2 naming songs not in"),
    ("trigger_song_id,rec_song_id\n", "pairs.csv: no usable pairs (0 rows"),
    ("trigger_song_id,rec\na,b\n", "pairs.csv: line 1 (header): missing required column(s) rec_song_id"),
    ("trigger_song_id,rec_song_id\na,b,c\n", "pairs.csv: line 2 (row 0): 3 fields"),
])
def test_unusable_pair_file_is_an_error_naming_the_file(tmp_path, content, expect):
    p = tmp_path / "pairs.csv"
    p.write_text(content)
    with pytest.raises(CatalogError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.load_pairs(str(p), _catalog3(tmp_path))
    assert expect in str(e.value), str(e.value)


def test_favourites_unknown_songs_dropped_with_count_and_bad_rows_named(tmp_path):
    cat = _catalog3(tmp_path)
    p = tmp_path / "fav.csv"
    p.write_text("user_id,song_id,timestamp\nu1,a,1\nu1,zz,2\nu2,b,3\n")
    with pytest.warns(UserWarning, match=r"fav.csv: dropped 1 of 3 rows.*line 3: 'zz'"):
        assert [(u, r) for u, r, _ in data.load_favourites(str(p), cat)] == [("u1", 0), ("u2", 1)]
    for timestamps, line in [("1\nu1,b,last tuesday", 3), ("nan", 2), ("1\nu1,b,inf", 3)]:
        p.write_text(f"user_id,song_id,timestamp\nu1,a,{timestamps}\n")
        with pytest.raises(CatalogError, match=rf"fav.csv: line {line} \(row {line - 2}\), column 'timestamp'"):
            data.load_favourites(str(p), cat)
    p.write_text("user_id,song_id,timestamp\nu1,zz,1\n")
    with pytest.raises(CatalogError, match="fav.csv: no usable favourites"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.load_favourites(str(p), cat)
    p.write_text("user_id,song,timestamp\nu1,a,1\n")
    with pytest.raises(CatalogError, match="fav.csv: line 1 \\(header\\): missing required column\\(s\\) song_id"):
        data.load_favourites(str(p), cat)


# --- security: caches are data, paths are data ------------------------------------------------

class _Payload:
    """Unpickling this runs code (it creates a file); a cache loader must never do that."""
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cache_with_a_pickled_length_file_is_refused_without_unpickling(tmp_path):
    sf.write(tmp_path / "a.wav", music(1.0), 16000)
    cat_path, cache_dir = write_catalog(tmp_path / "cat.csv", [["a", "a.wav", "t", "", ""]]), str(tmp_path / "cache")
    data.prepare(cat_path, cache_dir)
    cat = data.load_catalog(cat_path)
    len_path = os.path.join(cache_dir, "len-00000-of-00001.npy")
    marker = str(tmp_path / "code-ran")
    _Payload.marker = marker
    for how in ("object_npy", "raw_pickle", "wrong_dtype"):
        if how == "object_npy":  # a .npy holding an object array (its payload is a pickle)
            np.save(len_path, np.array([_Payload()], dtype=object), allow_pickle=True)
        elif how == "raw_pickle":
            with open(len_path, "wb") as f:
                pickle.dump(_Payload(), f)
        else:
            np.save(len_path, np.array([1251.0]))
        for load in (lambda: data.MelCache.open(cache_dir, cat), lambda: data.prepare(cat_path, cache_dir)):
            with pytest.raises(CatalogError, match="len-00000-of-00001.npy: "):
                load()
        assert not os.path.exists(marker)
    # the mel file too
    np.save(len_path, np.array([17], np.int32))
    np.save(os.path.join(cache_dir, "mel-00000-of-00001.npy"), np.array([_Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(CatalogError, match="mel-00000-of-00001.npy: not a log-mel file"):
        data.MelCache.open(cache_dir, cat).mel(0)
    assert not os.path.exists(marker)


def test_data_py_never_unpickles_or_runs_a_shell():
    tree = ast.parse(open(os.path.join(ROOT, "data.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not {"subprocess", "pickle", "marshal", "shelve"} & set(names), ast.unparse(node)
        if isinstance(node, ast.Call):
            f = ast.unparse(node.func)
            assert f not in ("os.system", "os.popen", "eval", "exec", "torch.load", "pickle.load"), ast.unparse(node)
            assert not any(k.arg == "shell" for k in node.keywords), ast.unparse(node)
            if f in ("np.load", "numpy.load"):  # every .npy read says so explicitly
                assert any(k.arg == "allow_pickle" and ast.unparse(k.value) == "False" for k in node.keywords), \
                    ast.unparse(node)


def test_catalog_paths_are_read_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = [f"$(touch {marker}).wav", f"x.wav; touch {marker}", f"`touch {marker}`"]
    cat_path = write_catalog(tmp_path / "cat.csv", [[f"s{k}", p, "t", "", ""] for k, p in enumerate(evil)])
    counts = data.prepare(cat_path, str(tmp_path / "cache"), max_bad=1.0)
    assert counts["failed"] == 3 and not marker.exists()
    reasons = [r["reason"] for r in read_report(counts["report"])]
    assert all(r.startswith("FileNotFoundError") for r in reasons), reasons


# =============================================================================
# evaluate.py: metrics and protocols
# =============================================================================

@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread buys nothing and, on a busy 2-core machine,
    waiting for it can make a test 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# Metrics


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_recall_at_k_matches_brute_force():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((57, 8)), rng.standard_normal((57, 8))
    k[:20] = q[:20] + 0.3 * rng.standard_normal((20, 8))  # some queries find their positive
    sims = _unit(q) @ _unit(k).T
    for K in (1, 5, 10):
        brute = np.mean([i in np.argsort(-sims[i], kind="stable")[:K] for i in range(57)])
        assert metrics.recall_at_k(q, k, K, batch_size=16) == pytest.approx(brute)
        assert metrics.recall_at_k(torch.tensor(q), torch.tensor(k), K) == pytest.approx(brute)  # torch input too


def test_score_blocks_follow_the_memory_budget(monkeypatch):
    """With a budget of 5 rows of scores, retrieval runs in blocks of 5 and finds the same neighbours."""
    rng = np.random.default_rng(1)
    q, keys = rng.standard_normal((23, 8)), rng.standard_normal((57, 8))
    full_s, full_i = metrics.cosine_topk(q, keys, 7)
    rec = metrics.recall_at_k(q, keys[:23], 3)
    monkeypatch.setattr(metrics, "SCORE_BLOCK_BYTES", 4 * 57 * 5)
    assert metrics._rows_per_block(57, 1024) == 5 and metrics._rows_per_block(57, 2) == 2
    assert metrics._rows_per_block(10**9, 1024) == 1  # never 0 rows
    s, i = metrics.cosine_topk(q, keys, 7)
    brute = np.argsort(-(_unit(q) @ _unit(keys).T), axis=1, kind="stable")[:, :7]
    assert torch.equal(i, full_i) and torch.allclose(s, full_s, atol=1e-6) and (i.numpy() == brute).all()
    assert metrics.recall_at_k(q, keys[:23], 3) == rec


def test_recall_at_k_of_a_collapsed_model_is_zero():
    same = np.ones((10, 4))
    assert metrics.recall_at_k(same, same, 1) == 0.0  # ties count against the query


def test_map_at_k_hand_worked():
    # ranked list: hit, miss, hit, miss; 3 relevant in total; k = 4
    # AP = (P@1 + P@3) / min(4, 3) = (1 + 2/3) / 3
    assert metrics.map_at_k([[1, 0, 1, 0]], [3], 4) == pytest.approx((1 + 2 / 3) / 3)
    # a perfect list with fewer relevant than k scores 1; a query with none is left out
    assert metrics.map_at_k([[1, 1, 0, 0], [0, 0, 0, 0]], [2, 0], 4) == pytest.approx(1.0)
    # only the first k positions count
    assert metrics.map_at_k([[0, 1, 1]], [2], 2) == pytest.approx(0.5 / 2)


def test_map_at_k_matches_loop():
    rng = np.random.default_rng(1)
    rel = rng.random((30, 12)) < 0.3
    n_rel = rel.sum(1) + rng.integers(0, 4, 30)
    loop = []
    for r, n in zip(rel, n_rel):
        if n == 0:
            continue
        hits, total = 0, 0.0
        for i in range(10):
            if r[i]:
                hits += 1
                total += hits / (i + 1)
        loop.append(total / min(10, n))
    assert metrics.map_at_k(rel, n_rel, 10) == pytest.approx(np.mean(loop))


def test_ndcg_at_k_hand_worked():
    # relevant at ranks 2 and 3, two relevant in total: DCG = 1/log2(3) + 1/log2(4), IDCG = 1 + 1/log2(3)
    dcg, idcg = 1 / math.log2(3) + 0.5, 1 + 1 / math.log2(3)
    assert metrics.ndcg_at_k([[0, 1, 1]], [2], 3)[0] == pytest.approx(dcg / idcg)
    # a relevant item below the cut-off adds nothing to DCG but still counts in the ideal
    assert metrics.ndcg_at_k([[1, 0, 0]], [5], 3)[0] == pytest.approx(1 / (1 + 1 / math.log2(3) + 0.5))
    assert np.isnan(metrics.ndcg_at_k([[0, 0]], [0], 2)[0])


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(2)
    for _ in range(5):
        scores = rng.integers(0, 6, 80).astype(float)  # many ties
        labels = rng.random(80) < 0.4
        pos, neg = scores[labels], scores[~labels]
        pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert metrics.auc(scores, labels) == pytest.approx(pairwise)
    assert metrics.auc([0.1, 0.9, 0.4], [0, 1, 0]) == 1.0
    assert np.isnan(metrics.auc([0.1, 0.2], [1, 1]))


def test_macro_f1_hand_worked():
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 2, 1, 0, 0]
    # class 0: tp 1 (i0), fp 2 (i3, i4), fn 1 (i1) -> 2/(2+2+1); class 1: tp 1, fp 0, fn 1 (i3) -> 2/3
    # class 2: tp 0 -> 0
    expected = np.mean([2 / 5, 2 / 3, 0.0])
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx(expected)


# -----------------------------------------------------------------------------
# Matching


def _brute_force_hits(emb, triggers, targets, per_trigger, list_size, merge):
    e = _unit(np.asarray(emb, dtype=np.float64))
    hits = []
    for trig, target in zip(triggers.tolist(), targets.tolist()):
        ranked = []  # per trigger, its kept neighbours best first
        for t in trig:
            s = e @ e[t]
            s[trig] = -np.inf
            order = np.argsort(-s, kind="stable")[:per_trigger]
            ranked.append([(int(j), s[j]) for j in order])
        if merge == "best":
            best = {}
            for lst in ranked:
                for j, s in lst:
                    best[j] = max(best.get(j, -np.inf), s)
            merged = sorted(best, key=lambda j: -best[j])[:list_size]
        else:  # round-robin, most recent trigger first
            merged = []
            for r in range(per_trigger):
                for lst in reversed(ranked):
                    if r < len(lst) and lst[r][0] not in merged:
                        merged.append(lst[r][0])
            merged = merged[:list_size]
        hits.append(target in merged)
    return np.array(hits)


@pytest.mark.parametrize("merge", ["best", "round-robin"])
def test_matching_hits_match_brute_force(merge):
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((6, 16))
    emb = centers[rng.integers(0, 6, 400)] + 0.6 * rng.standard_normal((400, 16))  # clusters: triggers crowd each other
    users, T = 60, 5
    history = np.stack([rng.choice(400, T + 1, replace=False) for _ in range(users)])
    e = _unit(emb)
    for u in range(30):  # half the users get a target near their latest trigger, so hits happen
        near = [j for j in np.argsort(-(e @ e[history[u, -2]])) if j not in history[u, :-1]]
        history[u, -1] = near[rng.integers(0, 5)]
    triggers, targets = torch.tensor(history[:, :-1]), torch.tensor(history[:, -1])
    for per_trigger, list_size in ((4, 12), (3, 7), (6, 30)):
        got = ev.matching_hits(torch.tensor(emb, dtype=torch.float32), triggers, targets, per_trigger, list_size,
                               merge, batch_size=16, progress=False).numpy()
        want = _brute_force_hits(emb, triggers, targets, per_trigger, list_size, merge)
        assert (got == want).all()
        assert 0 < want.sum() < users  # the test sees both outcomes


def test_matching_cases_take_the_30_favourites_before_a_seeded_target():
    favs = []
    for u, n in (("a", 40), ("b", 30), ("c", 35)):  # b has only 30: no song can have 30 before it
        favs += [(u, 100 * ord(u) + i, float(i)) for i in range(n)]
    favs += [("c", 100 * ord("c") + 3, 99.0)]  # c favours a song again: counted once
    favs.sort(key=lambda f: (f[0], f[2]))
    triggers, targets, users, stats = ev.sample_matching_cases(favs, n_triggers=30, seed=0)
    assert users == ["a", "c"] and stats == {"users": 3, "eligible": 2, "duplicates": 1}
    for trig, target in zip(triggers.tolist(), targets.tolist()):
        base = target - (target % 100)
        pos = target % 100
        assert pos >= 30 and trig == list(range(base + pos - 30, base + pos))
    again = ev.sample_matching_cases(favs, n_triggers=30, seed=0)
    assert torch.equal(again[1], targets)  # the seed fixes the targets


# -----------------------------------------------------------------------------
# CrossMuSim retrieval


def test_music_to_music_map_matches_brute_force():
    rng = np.random.default_rng(4)
    tags = rng.choice(["rock", "jazz", "folk", ""], 90)
    emb = rng.standard_normal((90, 6)) + 1.5 * np.eye(6)[np.searchsorted(["", "folk", "jazz", "rock"], tags)]
    sims = _unit(emb) @ _unit(emb).T
    aps = []
    for q in range(90):
        if tags[q] == "":
            continue
        n_rel = int(((tags == tags[q]).sum()) - 1)
        if n_rel == 0:
            continue
        order = [j for j in np.argsort(-sims[q], kind="stable") if j != q][:10]
        hits, total = 0, 0.0
        for i, j in enumerate(order):
            if tags[j] == tags[q]:
                hits += 1
                total += hits / (i + 1)
        aps.append(total / min(10, n_rel))
    got, n = crossmusim.music_to_music_map(emb, tags, k=10, batch_size=7)
    assert n == len(aps) and got == pytest.approx(np.mean(aps))


def test_text_to_music_hand_worked():
    songs = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=float)
    tags = ["rock", "jazz", "jazz", "rock"]
    queries = np.array([[1, 0], [0, 1], [1, 1]], dtype=float)
    # "rock" ranks 0,1,3,2: hit at 1 and 3 -> AP@10 = (1 + 2/3) / 2; R@1 yes
    # "jazz" ranks 2,3,1,0: hit at 1 and 3 -> same AP; R@1 yes
    # "opera" has no song: left out
    out = crossmusim.text_to_music(queries, ["rock", "jazz", "opera"], songs, tags, ks=(1, 2))
    assert out["queries"] == 2
    assert out["R@1"] == 1.0 and out["R@2"] == 1.0
    assert out["mAP@10"] == pytest.approx((1 + 2 / 3) / 2)


def test_same_artist_stats_match_loop():
    rng = np.random.default_rng(5)
    artists = rng.choice(["x", "y", "z", "w", ""], 50)
    emb = rng.standard_normal((50, 4))
    sims = _unit(emb) @ _unit(emb).T
    counts = []
    for q in range(50):
        if artists[q] == "":
            continue
        order = [j for j in np.argsort(-sims[q], kind="stable") if j != q][:5]
        counts.append(sum(artists[j] == artists[q] for j in order))
    counts = np.array(counts)
    out = crossmusim.same_artist_stats(emb, artists, k=5)
    assert out["share_with_same_artist"] == pytest.approx((counts > 0).mean())
    assert out["mean_same_artist"] == pytest.approx(counts.mean())
    assert out["mean_same_artist_given_any"] == pytest.approx(counts[counts > 0].mean())


# -----------------------------------------------------------------------------
# Probe


def test_probe_is_near_perfect_on_separable_data_and_near_chance_on_random_labels():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((600, 10)).astype(np.float32)
    w = rng.standard_normal((10, 3))
    labels = np.array(["abc"[i] for i in (x @ w).argmax(1)])
    split = np.where(rng.random(600) < 0.75, "train", "test")
    fit = ev.run_probe(x, labels, split, seeds=(0, 1), epochs=10)
    assert fit["acc"][0] > 0.93 and fit["macro_f1"][0] > 0.9
    noise = ev.run_probe(x, rng.choice(list("abc"), 600), split, seeds=(0, 1), epochs=10)
    assert abs(noise["acc"][0] - 1 / 3) < 0.1
    linear = ev.run_probe(x, labels, None, seeds=(0,), epochs=10, hidden=0, test_fraction=0.3)  # seeded split
    assert linear["acc"][0] > 0.85 and 140 < linear["n_test"] < 220


def test_probe_counts_unseen_test_labels_as_wrong_not_dropped():
    # Two well-separated clusters, a and b; the last test song sits in cluster a but carries a
    # label no training song has. Every seen test song is classified right, so the accuracy is
    # 9/10 if the unseen one counts as wrong and 1.0 if it were dropped.
    rng = np.random.default_rng(0)
    cluster = np.array([0, 1] * 15 + [0, 1] * 5)
    x = (3 * np.eye(2)[cluster] + 0.1 * rng.standard_normal((40, 2))).astype(np.float32)
    labels = np.array(["ab"[c] for c in cluster], dtype=object)
    labels[-2] = "zzz"  # cluster 0: predicted "a", wrong
    split = np.array(["train"] * 30 + ["test"] * 10)
    r = ev.run_probe(x, labels, split, seeds=(0,), epochs=1, min_steps=50)
    assert r["n_test"] == 10 and r["unseen_test_labels"] == 1
    assert r["acc"][0] == pytest.approx(0.9)
    # macro-F1 over the classes present: a (4 right, 1 false positive) 8/9, b 1, unseen 0
    assert r["macro_f1"][0] == pytest.approx((8 / 9 + 1 + 0) / 3)


# -----------------------------------------------------------------------------
# Ranking (DIN)


def _planted_impressions(seed=0, users=120, songs=200, per_day=12):
    """Users like one of 4 song clusters: a click is likely on their cluster, rare elsewhere.
    The cluster is visible in the song embeddings, and in the user's earlier clicks."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 4, songs)
    emb = np.eye(4)[cluster] * 2 + 0.5 * rng.standard_normal((songs, 4))
    emb = np.concatenate([emb, 0.5 * rng.standard_normal((songs, 12))], 1).astype(np.float32)
    rows = {k: [] for k in ("user_id", "row", "day", "clicked", "favoured")}
    for u in range(users):
        taste = rng.integers(0, 4)
        for day in range(1, 9):
            for s in rng.integers(0, songs, per_day):
                click = rng.random() < (0.7 if cluster[s] == taste else 0.08)
                rows["user_id"].append(f"u{u}")
                rows["row"].append(s)
                rows["day"].append(day)
                rows["clicked"].append(click)
                rows["favoured"].append(click and rng.random() < (0.8 if s % 2 == 0 else 0.2))
    return emb, {k: np.asarray(v, dtype=object if k == "user_id" else None) for k, v in rows.items()}


def test_din_learns_a_planted_signal_and_music_embeddings_beat_random():
    emb, imp = _planted_impressions()
    music = ev.run_ranking(emb, imp, "ctr", epochs=3, seeds=(0,))
    assert music["auc"][0] > 0.75, music
    rand = ev.run_ranking(embeddings.random_embeddings(len(emb), emb.shape[1]), imp, "ctr", epochs=3, seeds=(0,))
    assert music["auc"][0] > rand["auc"][0] + 0.05, (music, rand)


def test_din_history_holds_only_earlier_days_and_cvr_only_clicked():
    imp = {"user_id": np.array(["u", "u", "u", "u", "v"], dtype=object), "row": np.array([1, 2, 3, 4, 5]),
           "day": np.array([1, 1, 2, 3, 1]), "clicked": np.array([1, 1, 0, 1, 1]),
           "favoured": np.array([0, 1, 0, 1, 0])}
    ex = ev.build_din_examples(imp["user_id"], imp["row"], imp["day"], imp["clicked"], imp["favoured"], "ctr",
                               max_len=3)
    h = ex["history"].tolist()
    assert h[0] == [-1, -1, -1] and h[1] == [-1, -1, -1]  # day 1: nothing before it, not even same-day clicks
    assert h[2] == [-1, 1, 2] and h[3] == [-1, 1, 2]       # day 3: day-2 impression was not clicked
    assert h[4] == [-1, -1, -1]                              # another user's clicks never leak
    cvr = ev.build_din_examples(imp["user_id"], imp["row"], imp["day"], imp["clicked"], imp["favoured"], "cvr")
    assert cvr["target"].tolist() == [1, 2, 4, 5] and cvr["label"].tolist() == [0, 1, 1, 0]


# -----------------------------------------------------------------------------
# Figure 2


def test_separation_and_pairs_from_impressions():
    out = ev.separation([0.9, 0.8, 0.5], [0.1, 0.5])
    # pairs won by each positive: 0.9 -> 2, 0.8 -> 2, 0.5 -> 1 + a tie (1/2)
    assert out["mean_gap"] == pytest.approx(2.2 / 3 - 0.3) and out["auc"] == pytest.approx((2 + 2 + 1.5) / 6)
    imp = {"user_id": np.array(["u"] * 5, dtype=object), "row": np.array([1, 2, 3, 4, 1]),
           "day": np.array([1, 1, 2, 2, 3]), "clicked": np.array([1, 1, 0, 1, 1]),
           "favoured": np.array([1, 0, 0, 1, 0])}
    a, s, pos = ev.pairs_from_impressions(imp)
    # day 1 has no earlier favourite; day 2 anchors on song 1; day 3 on song 4 (most recent)
    assert a.tolist() == [1, 1, 4] and s.tolist() == [3, 4, 1] and pos.tolist() == [False, True, False]


def test_plot_histograms_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    rng = np.random.default_rng(7)
    path = tmp_path / "fig" / "f2.png"
    high, low = 0.8 + 0.15 * rng.random(50), -0.9 + 0.2 * rng.random(40)
    # panel a: positives near +1, negatives near -1; panel b the other way round (and fewer songs)
    ev.plot_histograms({"a": (high, low), "b": (low[:9], high[:5])}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(str(path))[..., :3]  # (H, W, RGB) in [0, 1]
    assert img.shape[:2] == (round(3.2 * 120), round(2 * 4.2 * 120))  # two panels side by side, figsize x dpi
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    red = (r - g > 0.25) & (r - b > 0.25)  # tab:red bars at alpha 0.55 on white
    grey = (abs(r - g) < 0.02) & (abs(g - b) < 0.02) & (r > 0.65) & (r < 0.8)  # tab:gray bars
    half = img.shape[1] // 2
    for panel, pos_right in ((slice(None, half), True), (slice(half, None), False)):
        red_cols, grey_cols = np.nonzero(red[:, panel])[1], np.nonzero(grey[:, panel])[1]
        assert len(red_cols) > 1000 and len(grey_cols) > 1000, (len(red_cols), len(grey_cols))
        # the positives' bars stand where the positives are: right of the negatives in a, left in b
        gap = np.median(red_cols) - np.median(grey_cols)
        assert (gap if pos_right else -gap) > 0.3 * half, gap


# -----------------------------------------------------------------------------
# Artist graph (GraphSAGE): the tests are in the artist-graph block near the end of the file.


# -----------------------------------------------------------------------------
# Embedding files and the command line


def _write_world(tmp_path, n=80, users=12, seed=10):
    rng = np.random.default_rng(seed)
    genres = rng.choice(["rock", "jazz", "folk"], n)
    with open(tmp_path / "catalog.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["song_id", "audio", "title", "artists", "lyrics", "genre", "language", "artist_id", "split"])
        for i in range(n):
            w.writerow([f"s{i}", f"audio/s{i}.wav", f"t{i}", f"art{i % 9}", "la la", genres[i],
                        rng.choice(["en", "fr"]), f"a{i % 9}", "test" if i % 4 == 0 else "train"])
    emb = 2 * np.eye(3)[np.searchsorted(["folk", "jazz", "rock"], genres)] + 0.3 * rng.standard_normal((n, 3))
    emb = np.concatenate([emb, rng.standard_normal((n, 5))], 1).astype(np.float32)
    order = rng.permutation(n)  # the file's row order need not be the catalog's
    np.save(tmp_path / "e.npy", emb[order])
    (tmp_path / "e.ids.txt").write_text("".join(f"s{i}\n" for i in order))
    with open(tmp_path / "favourites.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "song_id", "timestamp"])
        for u in range(users):
            for t, s in enumerate(rng.choice(n, 8, replace=False)):
                w.writerow([f"u{u}", f"s{s}", t])
    with open(tmp_path / "impressions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "song_id", "day", "clicked", "favoured"])
        for u in range(users):
            for day in range(1, 9):
                for s in rng.choice(n, 5, replace=False):
                    c = int(rng.random() < 0.4)
                    w.writerow([f"u{u}", f"s{s}", day, c, int(c and rng.random() < 0.5)])
    with open(tmp_path / "artist_split.csv", "w", newline="") as f:
        f.write("artist_id,split\n" + "".join(f"a{i},{'train' if i < 5 else 'test'}\n" for i in range(9)))
    with open(tmp_path / "artist_graph.csv", "w", newline="") as f:
        f.write("artist_a,artist_b\n" + "".join(f"a{i},a{(i + 1) % 9}\na{i},a{(i + 3) % 9}\n" for i in range(9)))
    return emb


def test_embeddings_file_is_aligned_to_the_catalog_by_song_id(tmp_path):
    from data import load_catalog
    emb = _write_world(tmp_path)
    catalog = load_catalog(tmp_path / "catalog.csv")
    got = embeddings.song_embeddings(str(tmp_path / "e.npy"), catalog)
    assert np.allclose(got, emb)
    (tmp_path / "e.ids.txt").write_text("".join(f"s{i}\n" for i in range(1, 81)))  # s0 missing, s80 unknown
    with pytest.raises(ValueError, match="no embedding for 1 of 80 songs, e.g. s0"):
        embeddings.song_embeddings(str(tmp_path / "e.npy"), catalog)
    folder = tmp_path / "embed_out"
    embeddings.save_embeddings(folder, [s.song_id for s in catalog.songs], {"audio": emb})
    assert np.allclose(embeddings.song_embeddings(str(folder), catalog), emb)
    with pytest.raises(FileNotFoundError, match="no text.npy"):
        embeddings.song_embeddings(str(folder), catalog, kind="text")


def test_cli_runs_every_protocol_on_a_tiny_world(tmp_path, capsys):
    """Each command's numbers equal a direct computation on the same embeddings (brute force or the
    library function the command should call with the options given), not just its keys."""
    emb = _write_world(tmp_path)  # catalog order; e.npy holds the rows shuffled, with e.ids.txt
    c, e = str(tmp_path / "catalog.csv"), str(tmp_path / "e.npy")
    catalog = data.load_catalog(c)
    genre = np.array([catalog.label(r, "genre") for r in range(len(catalog))], dtype=object)
    probe = ev.main(["probe", "--catalog", c, "--emb", e, "--emb", "random:8", "--seeds", "2", "--epochs", "30"])
    assert probe["e/genre"]["acc"][0] > 0.8 and probe["random:8/genre"]["acc"][0] < 0.7
    assert probe["e/genre"]["n_test"] == 20  # the catalog's split column: every 4th of 80 songs is test
    m = ev.main(["matching", "--catalog", c, "--emb", e, "--favourites", str(tmp_path / "favourites.csv"),
                 "--triggers", "5", "--per_trigger", "3", "--list_size", "10"])
    triggers, targets, _, _ = ev.sample_matching_cases(data.load_favourites(str(tmp_path / "favourites.csv"), catalog),
                                                       5, seed=0)
    assert m["e"]["users"] == 12
    assert m["e"]["hr"] == pytest.approx(_brute_force_hits(emb, triggers, targets, 3, 10, "best").mean())
    r = ev.main(["ranking", "--catalog", c, "--emb", e, "--impressions", str(tmp_path / "impressions.csv"),
                 "--epochs", "1", "--json", str(tmp_path / "r.json")])
    assert set(r) == {"e/ctr", "e/cvr"}
    assert json.loads((tmp_path / "r.json").read_text())["results"]["e/ctr"]["n_test"] == 60
    with open(tmp_path / "impressions.csv") as f:
        imp = list(csv.DictReader(f))
    # CTR: every impression, the last day (8) held out; CVR: clicked impressions only
    assert (r["e/ctr"]["n_train"], r["e/ctr"]["n_test"]) == (len(imp) - 60, 60)
    assert r["e/cvr"]["n_train"] + r["e/cvr"]["n_test"] == sum(row["clicked"] == "1" for row in imp)
    assert all(0 <= r[k]["auc"][0] <= 1 for k in r)
    rel = ev.main(["retrieval", "--catalog", c, "--emb", e, "--tag", "genre", "--k", "10"])
    assert rel["e/genre/m2m"]["mAP@10"] > 0.6
    assert rel["e/genre/m2m"]["mAP@10"] == pytest.approx(crossmusim.music_to_music_map(emb, genre, 10)[0])
    artist_id = np.array([catalog.label(r, "artist_id") for r in range(len(catalog))], dtype=object)
    assert rel["e/same_artist"] == pytest.approx(crossmusim.same_artist_stats(emb, artist_id, 10))
    with open(tmp_path / "pairs.csv", "w") as f:
        f.write("anchor,song,label\ns0,s1,positive\ns0,s2,negative\ns3,s4,1\ns5,s6,0\n")
    if importlib.util.find_spec("matplotlib"):
        d = ev.main(["distance", "--catalog", c, "--emb", e, "--pairs", str(tmp_path / "pairs.csv"),
                     "--out", str(tmp_path / "f2.png")])
        u = _unit(emb.astype(np.float64))
        pos, neg = [u[0] @ u[1], u[3] @ u[4]], [u[0] @ u[2], u[5] @ u[6]]
        assert (d["e"]["n_pos"], d["e"]["n_neg"]) == (2, 2) and os.path.exists(tmp_path / "f2.png")
        assert d["e"]["auc"] == pytest.approx(np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg]))
        assert d["e"]["mean_gap"] == pytest.approx(np.mean(pos) - np.mean(neg), abs=1e-5)
    g = ev.main(["artist-graph", "--edges", str(tmp_path / "artist_graph.csv"), "--artist_split",
                 str(tmp_path / "artist_split.csv"), "--features", "random", "--features", "mean", "--catalog", c,
                 "--emb", e, "--layers", "0", "1", "--epochs", "2", "--k", "5"])
    assert set(g) == {"random", "mean(e)"} and set(g["random"]) == {"0", "1"}
    for f in g.values():  # NDCG@5; 4 hidden edges, so some hit; the released formula is always the lower
        for v in f.values():
            assert 0 < v["ndcg@5_released_formula"][0] < v["ndcg@5"][0] <= 1
    out = capsys.readouterr().out
    assert "| e | genre |" in out and "HR@10" in out


def test_cli_rejects_typos_and_names_the_bad_row(tmp_path):
    _write_world(tmp_path)
    with pytest.raises(SystemExit):
        ev.main(["probe", "--catalog", str(tmp_path / "catalog.csv"), "--emb", "random", "--lables", "genre"])
    with pytest.raises(SystemExit):
        ev.main(["probe", "--catalog", str(tmp_path / "catalog.csv"), "--emb", "random", "--lab", "genre"])
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("user_id,song_id,day,clicked,favoured\nu1,s1,1,1,0\nu1,s2,two,1,0\n")
    with pytest.raises(ValueError, match=r"bad.csv: line 3, column 'day'"):
        ev.main(["ranking", "--catalog", str(tmp_path / "catalog.csv"), "--emb", "random",
                 "--impressions", str(tmp_path / "bad.csv")])


# -----------------------------------------------------------------------------
# embed: a tiny artifact on real audio files


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Three songs (25 s, 4 s, 0.5 s) as WAV files, a catalog, and a tiny HTCL artifact."""
    from transformers import BertConfig, BertTokenizer
    d = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(11)
    os.makedirs(d / "audio")
    rows = []
    for i, seconds in enumerate((25.0, 4.0, 0.5)):
        t = np.arange(int(seconds * 16000)) / 16000
        x = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.7 * t))
        sf.write(d / "audio" / f"s{i}.wav", (x + 0.01 * rng.standard_normal(len(t))).astype(np.float32), 16000)
        rows.append(f"s{i},audio/s{i}.wav,song {i},artist {i},la la {i},rock,en,train\n")
    (d / "catalog.csv").write_text("song_id,audio,title,artists,lyrics,genre,language,split\n" + "".join(rows))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "title", "artists", "lyrics", ":", ";", "song", "artist",
             "la", "0", "1", "2", "rock", "jazz"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    bert = d / "bert"
    BertTokenizer(str(d / "vocab.txt"), do_lower_case=True).save_pretrained(bert)
    BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=64).save_pretrained(bert)
    torch.manual_seed(0)
    cfg = htcl.HTCLConfig(audio=htcl.AudioConfig(conv_channels=16, hidden=16, layers=1, heads=2, ffn=32,
                                                 pos_conv_kernel=5, pos_conv_groups=2),
                          text_model=str(bert), text_pretrained=False, text_pooling="cls",
                          proj_dims=(12, 8), fusion_dims=(8, 8))
    model = htcl.HTCL(cfg)
    from transformers import AutoTokenizer
    htcl.save_artifact(model, AutoTokenizer.from_pretrained(bert), str(d / "artifact"))
    return d


def test_embed_writes_normalized_embeddings_that_do_not_depend_on_batching(tiny_world):
    d = tiny_world
    for batch in ("1", "3"):
        ev.main(["embed", "--artifact", str(d / "artifact"), "--catalog", str(d / "catalog.csv"),
                 "--out", str(d / f"emb{batch}"), "--text", "--fused", "--batch_size", batch])
    assert (d / "emb1" / "ids.txt").read_text() == "s0\ns1\ns2\n"
    for kind in embeddings.KINDS:
        a, b = np.load(d / "emb1" / f"{kind}.npy"), np.load(d / "emb3" / f"{kind}.npy")
        assert a.shape == (3, 8) and a.dtype == np.float32
        assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
        assert np.allclose(a, b, atol=1e-5)  # padding in a batch changes nothing
    # an artifact given as --emb is embedded on the fly, the same way
    from data import load_catalog
    catalog = load_catalog(d / "catalog.csv")
    on_the_fly = embeddings.song_embeddings(str(d / "artifact"), catalog, kind="fused")
    assert np.allclose(on_the_fly, np.load(d / "emb1" / "fused.npy"), atol=1e-5)


def test_chunked_embedding_is_the_mean_of_10s_windows(tiny_world):
    from data import MIN_FRAMES, load_catalog, song_mel
    from model import load_artifact
    d = tiny_world
    model, tokenizer = load_artifact(str(d / "artifact"))
    catalog = load_catalog(d / "catalog.csv")
    got = embeddings.embed_catalog(model, tokenizer, catalog, mode="chunked", batch_size=2)["audio"]
    for r in range(3):
        mel = song_mel(catalog[r].audio)
        starts = [s for s in range(0, len(mel), embeddings.CHUNK_FRAMES)
                  if s == 0 or len(mel) - s >= MIN_FRAMES]
        if r == 0:
            assert len(mel) == 261 and starts == [0, 104, 208]  # 25 s: two full windows and 53 frames
        with torch.no_grad():
            chunks = [model.encode_audio(mel[s:s + embeddings.CHUNK_FRAMES][None], normalize=False)[0] for s in starts]
        want = F.normalize(torch.stack(chunks).mean(0), dim=0).numpy()
        assert np.allclose(got[r], want, atol=1e-5)
    full = embeddings.embed_catalog(model, tokenizer, catalog, mode="full")["audio"]
    assert np.allclose(full[1:], got[1:], atol=1e-5)  # songs under 10 s are one window: both modes agree
    assert not np.allclose(full[0], got[0], atol=1e-3)


def test_retrieval_queries_tag_text_through_the_artifacts_text_tower(tiny_world, tmp_path):
    """T2M on 8 songs, 4 "rock" and 4 "jazz": the ranks, so R@1 and mAP, depend on the artifact's
    embeddings. Checked against a brute force: each song's audio and each query text
    ("genre: rock") through the artifact one at a time, the ranking by a Python sort."""
    from data import load_catalog, song_mel
    d = tiny_world
    rng = np.random.default_rng(5)
    rows = []
    for i in range(8):
        t = np.arange(int((1.0 + 0.25 * i) * 16000)) / 16000
        x = 0.3 * np.sin(2 * np.pi * (150 + 90 * i) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(tmp_path / f"s{i}.wav", x.astype(np.float32), 16000)
        rows.append(f"s{i},s{i}.wav,song {i},artist {i},la,{('rock', 'jazz')[i % 2]},en,train\n")
    (tmp_path / "catalog.csv").write_text("song_id,audio,title,artists,lyrics,genre,language,split\n" + "".join(rows))
    # The fixture's artifact with mean text pooling: a random BERT's [CLS] barely depends on the
    # text, which would let a wrong query text ("rock" for "genre: rock") rank the songs the same.
    shutil.copytree(d / "artifact", tmp_path / "artifact")
    config = json.loads((tmp_path / "artifact" / "config.json").read_text())
    (tmp_path / "artifact" / "config.json").write_text(json.dumps({**config, "text_pooling": "mean"}))
    out = ev.main(["retrieval", "--catalog", str(tmp_path / "catalog.csv"), "--emb", str(tmp_path / "artifact"),
                   "--tag", "genre", "--k", "10", "--template", "{column}: {value}"])["artifact/genre/t2m"]

    model, tok = htcl.load_artifact(tmp_path / "artifact")
    catalog = load_catalog(tmp_path / "catalog.csv")
    tags = [catalog.label(r, "genre") for r in range(8)]
    with torch.no_grad():
        songs = [model.encode_audio(song_mel(catalog[r].audio)[None])[0] for r in range(8)]
        r1, r5, aps = [], [], []
        for value in ("jazz", "rock"):
            q = model.encode_text(tok([f"genre: {value}"], return_tensors="pt"))[0]
            ranked = sorted(range(8), key=lambda r: -float(q @ songs[r]))
            rel = [tags[r] == value for r in ranked]
            r1.append(rel[0])
            r5.append(any(rel[:5]))
            hits = np.cumsum(rel)
            aps.append(sum(hits[i] / (i + 1) for i in range(8) if rel[i]) / 4)  # 4 relevant songs, all within k
    assert out["queries"] == 2
    assert out["R@1"] == np.mean(r1) and out["R@5"] == np.mean(r5)
    assert out["mAP@10"] == pytest.approx(np.mean(aps), abs=1e-6), (out, aps)


def test_report_writes_table2_and_figure2(tmp_path):
    pytest.importorskip("matplotlib")
    _write_world(tmp_path)
    from data import load_catalog
    catalog = load_catalog(tmp_path / "catalog.csv")
    table = ev.report({"e": str(tmp_path / "e.npy"), "random": "random"}, catalog,
                      favourites=str(tmp_path / "favourites.csv"), impressions=str(tmp_path / "impressions.csv"),
                      out_dir=str(tmp_path / "rep"), probe_seeds=(0,), ranking_epochs=1)
    lines = table.splitlines()
    assert lines[0] == "| Model | ACC genre | ACC lang | HR@100 | CTR AUC | CVR AUC | Fig. 2 AUC |"
    assert lines[2].startswith("| e | ") and lines[3].startswith("| random | ") and lines[4] == ""
    # this world's users have <= 30 favourites: HR@100 is "-", and the footnote says why
    assert lines[3].split(" | ")[3] == "-" and lines[5:] == [
        f'- HR@100 "-": no user of {tmp_path / "favourites.csv"} has more than 30 favourites (--triggers)']
    assert (tmp_path / "rep" / "table2.md").read_text().strip() == table
    assert (tmp_path / "rep" / "figure2.png").exists()


def test_report_results_do_not_depend_on_the_number_of_worker_threads(tmp_path):
    """report trains its probes and DIN models on several threads; every job is seeded and
    builds its model under one lock, so 1 thread and 4 give the same numbers, bit for bit."""
    pytest.importorskip("matplotlib")
    _write_world(tmp_path)
    from data import load_catalog
    catalog = load_catalog(tmp_path / "catalog.csv")
    out = {}
    for workers in (1, 4):
        ev.report({"e": str(tmp_path / "e.npy"), "random": "random", "random:7": "random:7"}, catalog,
                  impressions=str(tmp_path / "impressions.csv"), out_dir=str(tmp_path / f"w{workers}"),
                  probe_seeds=(0, 1), ranking_seeds=(0, 1), ranking_epochs=1, workers=workers)
        out[workers] = json.loads((tmp_path / f"w{workers}" / "table2.json").read_text())
    assert out[1] == out[4]
    assert list(out[4]) == ["e", "random", "random:7"]  # rows in the order given, whatever finished first
    assert set(out[4]["e"]) == {"acc_genre", "acc_language", "ctr_auc", "cvr_auc", "fig2_auc"}
    assert out[4]["random"]["acc_genre"] != out[4]["random:7"]["acc_genre"]  # and the jobs did differ


def test_report_reuses_results_only_for_the_same_embeddings_and_inputs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _write_world(tmp_path)
    from data import load_catalog
    catalog = load_catalog(tmp_path / "catalog.csv")
    kw = dict(impressions=str(tmp_path / "impressions.csv"), out_dir=str(tmp_path / "rep"), probe_seeds=(0,),
              ranking_epochs=1)
    first = ev.report({"e": str(tmp_path / "e.npy")}, catalog, **kw)
    capsys.readouterr()
    again = ev.report({"e": str(tmp_path / "e.npy"), "random": "random"}, catalog, **kw)
    said = capsys.readouterr().out
    assert said.count("reused from") == 4 and "report: e: probe genre reused" in said  # 2 probes, 2 DIN
    assert "report: random: probe genre reused" not in said
    assert again.splitlines()[2] == first.splitlines()[2]  # the e row, identical
    fresh = ev.report({"e": str(tmp_path / "e.npy"), "random": "random"}, catalog, **kw, reuse=False)
    assert "reused" not in capsys.readouterr().out and fresh == again  # retrained: the same numbers
    cli = ["report", "--catalog", str(tmp_path / "catalog.csv"), "--emb", str(tmp_path / "e.npy"), "--impressions",
           str(tmp_path / "impressions.csv"), "--out", str(tmp_path / "rep"), "--probe_seeds", "1"]
    ev.main(cli + ["--no-reuse"])
    assert "reused" not in capsys.readouterr().out
    ev.main(cli)
    assert capsys.readouterr().out.count("reused from") == 2  # the probes; DIN's 2 epochs differ from 1 above
    emb = np.load(tmp_path / "e.npy")
    emb[0, 0] += 1e-3  # other embeddings: trained again
    np.save(tmp_path / "e.npy", emb)
    ev.report({"e": str(tmp_path / "e.npy")}, catalog, **kw)
    assert "reused" not in capsys.readouterr().out
    ev.report({"e": str(tmp_path / "e.npy")}, catalog, **{**kw, "probe_seeds": (0, 1)})  # other settings: the
    said = capsys.readouterr().out  # probes train again, DIN is reused
    assert "probe genre reused" not in said and "ranking ctr reused" in said


def test_figure2_pairs_read_labelled_files_and_stage2_pairs(tmp_path):
    _write_world(tmp_path)
    from data import load_catalog
    catalog = load_catalog(tmp_path / "catalog.csv")
    (tmp_path / "l.csv").write_text("anchor,song,label\ns0,s1,positive\ns0,s2,0\ns3,nope,1\n")
    a, s, pos = embeddings.read_labelled_pairs(tmp_path / "l.csv", catalog)  # the unknown song is dropped aloud
    assert a.tolist() == [0, 0] and s.tolist() == [1, 2] and pos.tolist() == [True, False]
    (tmp_path / "p.csv").write_text("trigger_song_id,rec_song_id\ns0,s1\ns5,s6\n")
    a, s, pos = embeddings.read_labelled_pairs(tmp_path / "p.csv", catalog)
    assert a.tolist() == [0, 5, 0, 5] and s[:2].tolist() == [1, 6] and pos.tolist() == [True, True, False, False]
    assert s[2] not in (0, 1) and s[3] not in (5, 6)
    (tmp_path / "bad.csv").write_text("anchor,song,label\ns0,s1,maybe\n")
    with pytest.raises(ValueError, match=r"bad.csv: line 2, column 'label'"):
        embeddings.read_labelled_pairs(tmp_path / "bad.csv", catalog)


# -----------------------------------------------------------------------------
# End to end on sample_data, through the command lines a user types

PRESET = os.path.join("sample_data", "preset.toml")


def run(*cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


def read_log(out_dir):
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


@pytest.fixture(scope="module")
def stage2(tmp_path_factory, stage1, demo_cache):
    out = tmp_path_factory.mktemp("finetune")
    log = run(sys.executable, "finetune.py", "--preset", PRESET, "--cache", demo_cache,
              "--init_from", stage1 / "final", "--out_dir", out)  # the demo's stage 2
    assert "init_from" in log
    return out


def test_stage2_trains_from_the_stage1_artifact_and_its_artifact_loads(stage1, stage2):
    train, val = read_log(stage2)
    ln_b = math.log(64)
    last = train[-1]
    assert {"loss_aa", "loss_af", "loss_at"} <= set(last)
    # The favoured pairs carry signal: L_aa and L_af (both find the favoured song from the trigger's
    # audio) end below chance, and L_af is not much easier than L_aa (on this demo they end within
    # ~5% of each other). A miswired L_af that sees the recommended song's audio on both sides
    # drops to ~1.1 while L_aa stays near ln B. L_at keeps the audio-text alignment (stage 1 ends ~2.0).
    assert last["loss_aa"] < ln_b and 0.75 * last["loss_aa"] < last["loss_af"] < ln_b, last
    assert last["loss_at"] < 0.75 * ln_b, last
    assert val[-1]["val_loss"] < val[0]["val_loss"], val  # the held-out pairs' loss fell over the epochs
    m1, _ = htcl.load_artifact(stage1 / "final")
    m2, tok = htcl.load_artifact(stage2 / "final")
    assert m2.cfg == m1.cfg
    # Every tensor that stage 2 trains changed, and only those (here the unused text pooler is frozen).
    m2.freeze_unused(stage=2, use_text=True)
    trainable = {k for k, p in m2.named_parameters() if p.requires_grad}
    changed = {k for k, v in m2.state_dict().items() if not torch.equal(v, m1.state_dict()[k])}
    assert changed == trainable, (sorted(trainable - changed), sorted(changed - trainable))
    assert any(k.startswith("fusion.") for k in changed) and "logit_scale.af" in changed


def test_report_on_sample_data_stage2_beats_stage1_on_hr_and_stage1_beats_random_on_genre(
        tmp_path, stage1, stage2, demo_cache):
    """Table 2's qualitative claims on the synthetic world (fixed seeds): fine-tuning on favoured
    pairs raises HR@100, and stage 1 learns genre from audio-text alignment."""
    out = run(sys.executable, "evaluate.py", "report", "--catalog", "sample_data/catalog.csv", "--cache", demo_cache,
              "--favourites", "sample_data/favourites.csv", "--impressions", "sample_data/impressions.csv",
              "--emb", stage1 / "final", "--emb", stage2 / "final", "--emb", "random", "--out", tmp_path)
    print(out)
    assert (tmp_path / "table2.md").read_text().count("\n") == 5  # header, rule, 3 models
    png = (tmp_path / "figure2.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    res = json.loads((tmp_path / "table2.json").read_text())
    pre, fine, rnd = res[stage1.name], res[stage2.name], res["random"]
    assert fine["hr@100"] > pre["hr@100"] > rnd["hr@100"], res
    assert pre["acc_genre"][0] > rnd["acc_genre"][0] + 0.2, res


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


# --- Table 2 over seeds (sample_data/table2.sh) ---

def _seed_report(hr1, hrh, genre, lang):
    """One seed's report() results: HR@100 of stage 1 and HTCL; genre / language ACC per row as
    report() stores probe results, [mean over probe runs, std over probe runs]."""
    rows = {key: {"acc_genre": [genre[key], 0.05], "acc_language": [lang[key], 0.05], "hr@100": 0.1}
            for key in ("stage1", "htcl_w_cf", "htcl_wo_text", "htcl", "random")}
    rows["stage1"]["hr@100"], rows["htcl"]["hr@100"] = hr1, hrh
    return rows


def test_table2_over_seeds_hand_worked_mean_std_and_targets(tmp_path):
    # three seeds; the hand-worked means and sample stds (ddof 1) over seeds:
    #   stage 1 HR 0.20 0.25 0.30 -> 0.25 ± 0.05;  HTCL HR 0.60 0.70 0.80 -> 0.70 < 3 x 0.25: missed
    #   stage 1 genre 0.70 0.60 0.80 -> 0.70 ± 0.10; HTCL genre 0.61 0.60 0.62 -> 0.61 >= 0.60: met
    #     (a population std, 0.0816, would put the bar at 0.618 and miss it)
    #   stage 1 language 0.90 x3 -> ± 0; HTCL language 0.89 0.90 0.90 -> 0.8967 < 0.90: missed
    #   w_CF: genre 0.50 < 0.61 but language 0.95 > 0.8967: missed; w/o_text 0.60 and 0.80: met
    seeds = []
    for i, (hr1, hrh) in enumerate(((0.20, 0.60), (0.25, 0.70), (0.30, 0.80))):
        genre = {"stage1": (0.70, 0.60, 0.80)[i], "htcl": (0.61, 0.60, 0.62)[i], "htcl_w_cf": 0.50,
                 "htcl_wo_text": 0.60, "random": 0.2}
        lang = {"stage1": 0.90, "htcl": (0.89, 0.90, 0.90)[i], "htcl_w_cf": 0.95, "htcl_wo_text": 0.80,
                "random": 0.3}
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "table2.json").write_text(json.dumps(_seed_report(hr1, hrh, genre, lang)))
        np.savez(d / "figure2.npz", **{f"{k}/{side}": np.full(4, 0.1 * i) for k in
                                      ("stage1", "htcl_w_cf", "htcl_wo_text", "htcl", "random") for side in ("pos", "neg")})
    out = ev.main(["table2", *(str(tmp_path / f"s{i}") for i in range(3)), "--out", str(tmp_path / "t2")])
    rows = out["rows"]
    assert rows["Stage 1 (CLAP)"]["hr@100"]["mean"] == pytest.approx(0.25)
    assert rows["Stage 1 (CLAP)"]["hr@100"]["std"] == pytest.approx(0.05)
    assert rows["Stage 1 (CLAP)"]["acc_genre"]["per_seed"] == [0.70, 0.60, 0.80]  # probe means, not their stds
    assert rows["Stage 1 (CLAP)"]["acc_genre"]["std"] == pytest.approx(0.10)
    assert rows["HTCL"]["acc_language"]["mean"] == pytest.approx(0.8966667, abs=1e-6)
    assert [t["met"] for t in out["targets"]] == [False, True, False, False, True]
    assert out["targets"][0]["ratio"] == pytest.approx(2.8)
    text = (tmp_path / "t2" / "table2.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "| Model | ACC genre | ACC lang | HR@100 |"  # only the metrics every seed has
    assert lines[2].startswith("| Stage 1 (CLAP) | 0.7000 ± 0.1000 | 0.9000 ± 0.0000 | 25.00 ± 5.00% |")
    assert [ln.split(" | ")[0] for ln in lines[2:7]] == ["| Stage 1 (CLAP)", "| HTCL_w_CF", "| HTCL_w/o_text",
                                                         "| HTCL", "| random"]
    verdicts = [ln.rsplit(": ", 1)[1] for ln in lines if ln.startswith("- ")]
    assert verdicts == ["missed", "met", "missed", "missed", "met"]
    assert json.loads((tmp_path / "t2" / "table2.json").read_text())["targets"][1]["met"] is True
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "t2" / "figure2.png").exists()

    (tmp_path / "s2" / "table2.json").write_text(json.dumps({"stage1": {}, "htcl": {}}))  # a seed without rows
    with pytest.raises(SystemExit, match="table2: rows .*htcl_w_cf.* missing"):
        ev.main(["table2", str(tmp_path / "s0"), str(tmp_path / "s2"), "--out", str(tmp_path / "t3")])


# --- the released architecture, initialisation, checkpoint converter, no-grad gather ---

def released_audio_keys(n_convs, n_layers):
    """The state_dict names of the released AudioModel (models/audio_model.py), written from its source."""
    keys = ["cls_token"]
    for i in range(n_convs):  # nn.Sequential(Rearrange, Conv1d, Rearrange, LayerNorm, GELU)
        keys += [f"feature_extractor.layers.{i}.1.weight", f"feature_extractor.layers.{i}.3.weight",
                 f"feature_extractor.layers.{i}.3.bias"]
    keys += ["feature_projection.layer_norm.weight", "feature_projection.layer_norm.bias",
             "feature_projection.projection.weight", "feature_projection.projection.bias",
             "pos_conv_embed.conv.bias", "pos_conv_embed.conv.parametrizations.weight.original0",
             "pos_conv_embed.conv.parametrizations.weight.original1",
             "pos_conv_embed.layer_norm.weight", "pos_conv_embed.layer_norm.bias",
             "layer_norm.weight", "layer_norm.bias"]
    for i in range(n_layers):  # nn.TransformerEncoder(nn.TransformerEncoderLayer)
        p = f"transformer_encoder.layers.{i}."
        keys += [p + "self_attn.in_proj_weight", p + "self_attn.in_proj_bias", p + "self_attn.out_proj.weight",
                 p + "self_attn.out_proj.bias"]
        keys += [p + f"{m}.{w}" for m in ("linear1", "linear2", "norm1", "norm2") for w in ("weight", "bias")]
    return keys


def test_released_initialisation_identical_layers_xavier_attention_and_unit_cls():
    torch.manual_seed(0)
    enc = htcl.AudioEncoder()
    D = enc.cfg.hidden
    first = enc.layers[0].state_dict()
    for layer in enc.layers[1:]:  # nn.TransformerEncoder deep-copies one layer
        for k, v in layer.state_dict().items():
            assert torch.equal(v, first[k]), k
    assert 0.9 < enc.cls_token.std().item() < 1.1  # torch.randn over 768 values: std 1 +- ~0.03
    w = enc.layers[0].in_proj.weight
    bound = math.sqrt(6 / (D + 3 * D))  # Xavier-uniform over the whole (3D, D) in-projection
    # the max of 1.8M uniform draws sits at the bound; nn.Linear's default (bound 1/sqrt(D)) stays below 0.82 of it
    assert 0.99 * bound < w.abs().max().item() <= bound
    assert not enc.layers[0].in_proj.bias.any() and not enc.layers[0].out_proj.bias.any()
    # nn.Linear's default init for out_proj, linear1 and linear2: uniform within 1/sqrt(fan_in)
    assert enc.layers[0].out_proj.weight.abs().max().item() <= 1 / math.sqrt(D)


def test_initial_weights_equal_the_released_module_built_with_the_same_seed():
    """Built in the released order of random draws, AudioEncoder starts from the very weights of
    the released design (released_reference.ReferenceAudioEncoder: nn.TransformerEncoder, released key names)."""
    cfg = tiny_audio_config()
    torch.manual_seed(5)
    ref = released_reference.ReferenceAudioEncoder(cfg)
    assert list(ref.state_dict()) == released_audio_keys(3, cfg.layers)
    torch.manual_seed(5)
    ours = htcl.AudioEncoder(cfg).state_dict()
    mapped = {convert_released.released_key("audio_model." + k)[len("audio_encoder."):]: v for k, v in ref.state_dict().items()}
    assert set(mapped) == set(ours)
    for k, v in mapped.items():
        assert torch.equal(v, ours[k]), k


def test_bench_variants_flag_rejects_unknown_keys_and_other_rows(capsys):
    """bench.py --variants picks step variants by key: a typo lists the valid keys, and the flag
    means nothing without the step row (both refused before anything is measured)."""
    import bench
    with pytest.raises(SystemExit):
        bench.main(["--variants", "step_paper_abb"])
    err = capsys.readouterr().err
    assert "unknown --variants ['step_paper_abb']" in err and "step_paper_posln_ab" in err
    with pytest.raises(SystemExit):
        bench.main(["--rows", "data", "--variants", "step_paper_ab"])
    assert "add step to --rows" in capsys.readouterr().err


def _released_mlp(dims):
    """A released models/mlp.py MLP: (Linear, ReLU, Dropout(0)) blocks without the last ReLU and
    Dropout, so its Linear layers sit at indices 0, 3, 6."""
    blocks = []
    for a, b in zip(dims[:-1], dims[1:]):
        blocks += [torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Dropout(0.0)]
    return torch.nn.Sequential(*blocks[:-2])


def released_model_parts(stage, seed=0):
    """The modules of a released ModelWrapper at a tiny size, every tensor perturbed off its init
    (so that a swapped LayerNorm or a zero bias cannot hide a wrong mapping), and their state_dict
    in the released layout: audio_model.*, text_model.*, audio_mlp.*, text_mlp.*, [fusion_mlp.*], taus."""
    from transformers import AutoConfig, AutoModel
    torch.manual_seed(seed)
    parts = {"audio_model": released_reference.ReferenceAudioEncoder(tiny_audio_config()),
             "text_model": AutoModel.from_config(AutoConfig.from_pretrained(TINY_BERT)),
             "audio_mlp": _released_mlp([32, 16, 8, 6])}
    parts["text_mlp"] = _released_mlp([parts["text_model"].config.hidden_size, 16, 8, 6])
    if stage == 2:
        parts["fusion_mlp"] = _released_mlp([12, 12, 6, 6])
    state = {}
    with torch.no_grad():
        for name, module in parts.items():
            module.eval()
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    taus = {"tau": 2.1} if stage == 1 else {"tau_1": 2.2, "tau_2": 2.9, "tau_3": 3.3}
    state.update({k: torch.tensor(v) for k, v in taus.items()})
    return parts, state


@pytest.mark.parametrize("stage", [1, 2])
def test_convert_released_checkpoint_gives_the_released_embeddings_and_temperatures(tmp_path, stage):
    parts, state = released_model_parts(stage)
    torch.save(state, tmp_path / "model-3.pth")
    out = run(sys.executable, "tools/convert_released.py", tmp_path / "model-3.pth", "--text_model", TINY_BERT,
              "--out", tmp_path / "art", "--heads", 2)
    assert f"stage-{stage} checkpoint" in out
    from safetensors.torch import load_file
    model, tok = htcl.load_artifact(tmp_path / "art")  # strict=True inside
    assert set(load_file(tmp_path / "art" / "model.safetensors")) == set(model.state_dict())
    assert model.cfg.text_pooling == "pooler"
    want = {"at": 2.1, "aa": 2.6, "af": 2.6} if stage == 1 else {"at": 2.2, "aa": 2.9, "af": 3.3}
    assert {k: round(v.item(), 5) for k, v in model.logit_scale.items()} == want
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert bool(config["training"]["filled_fresh"]) == (stage == 1)

    # The released forward, module by module: audio (120 s = 1251 frames, no mask, mean over all
    # tokens, nn.TransformerEncoder) -> audio_mlp; BERT pooler_output -> text_mlp; fusion on the concat.
    mel = torch.randn(2, 1251, 128, generator=torch.Generator().manual_seed(1))
    tokens = dict(tok(["title: a b; artists: c; lyrics: d e f g", "title: h; artists: i; lyrics: j"],
                      padding=True, return_tensors="pt"))
    with torch.no_grad():
        audio = parts["audio_mlp"](parts["audio_model"](mel))
        text = parts["text_mlp"](parts["text_model"](**tokens).pooler_output)
        torch.testing.assert_close(model.encode_audio(mel, normalize=False), audio, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(tokens, normalize=False), text, atol=1e-5, rtol=1e-4)
        if stage == 2:
            fused = parts["fusion_mlp"](torch.cat([audio, text], 1))
            torch.testing.assert_close(model.fuse(audio, text, normalize=False), fused, atol=1e-5, rtol=1e-4)


def test_convert_released_refuses_a_key_it_cannot_place(tmp_path):
    _, state = released_model_parts(2)
    state["audio_model.adapter.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "model-1.pth")
    p = subprocess.run([sys.executable, "tools/convert_released.py", str(tmp_path / "model-1.pth"),
                        "--text_model", TINY_BERT, "--out", str(tmp_path / "art"), "--heads", "2"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "key 'audio_model.adapter.weight' has no place" in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "art").exists()
    del state["audio_model.adapter.weight"], state["audio_mlp.6.bias"]  # and one of ours left unfilled
    torch.save(state, tmp_path / "model-1.pth")
    with pytest.raises(convert_released.ConversionError, match="nothing in the checkpoint fills 'audio_proj.4.bias'"):
        convert_released.convert_released(tmp_path / "model-1.pth", TINY_BERT, tmp_path / "art", heads=2)


def test_released_preset_parses_into_both_stage_configs():
    import finetune
    import pretrain
    import training
    path = os.path.join(ROOT, "presets", "released.toml")
    pre = training.parse_config(pretrain.PretrainConfig, "pretrain", ["--preset", path])
    fine = training.parse_config(finetune.FinetuneConfig, "finetune", ["--preset", path])
    assert (pre.lr, pre.text_lr, pre.batch_per_device, pre.lr_schedule) == (1e-4, 1e-5, 32, "constant")
    assert pre.model.logit_scale_max == math.inf and pre.max_grad_norm == 0
    assert (fine.lr, fine.audio_lr, fine.text_lr, fine.batch_per_device) == (1e-4, 1e-5, 1e-5, 32)
    assert fine.init_heads == "fresh" and fine.use_trigger_text and fine.epochs == 20
    # the constant schedule keeps the lr; the default cosine one decays it
    assert pretrain.lr_lambda(100, 0, "constant")(99) == 1.0 > pretrain.lr_lambda(100, 0)(99)


def test_crossmusim_preset_parses_with_the_papers_settings():
    import pretrain
    import training
    path = os.path.join(ROOT, "presets", "crossmusim.toml")
    cfg = training.parse_config(pretrain.PretrainConfig, "pretrain", ["--preset", path])
    assert cfg.samples == "crossmusim" and tuple(cfg.text_types) == ("aspects", "caption", "lyrics")
    assert (cfg.lr, cfg.text_lr, cfg.global_batch, cfg.epochs, cfg.warmup_epochs) == (1e-4, 1e-4, 64, 41, 1.0)
    m = cfg.model
    assert not m.learn_temperature and math.isclose(1 / math.exp(m.logit_scale_init), 0.07)
    assert (m.audio_pooling, m.text_pooling, m.embed_mode, m.chunk_seconds) == ("cls", "mean", "chunked", 10.0)
    assert cfg.out_dir == os.path.join(ROOT, "runs", "crossmusim")  # relative to the preset's folder


def test_fresh_heads_are_seeded_and_leave_the_encoders():
    m = tiny_model()
    with torch.no_grad():
        for p in m.logit_scale.values():
            p.fill_(4.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.reset_heads(seed=7)
    first = {k: v.clone() for k, v in m.state_dict().items()}
    m.reset_heads(seed=7)
    assert all(torch.equal(v, first[k]) for k, v in m.state_dict().items())  # same seed, same heads
    m.reset_heads(seed=8)
    assert not torch.equal(m.state_dict()["fusion.0.weight"], first["fusion.0.weight"])
    for k, v in first.items():
        if k.startswith(("audio_proj.", "text_proj.", "fusion.")):
            assert not torch.equal(v, before[k]), k
        elif k.startswith("logit_scale."):
            assert v.item() == pytest.approx(2.6)
        else:
            assert torch.equal(v, before[k]), k  # both encoders untouched


def test_audio_lr_gives_the_audio_encoder_its_own_group():
    import pretrain
    m = tiny_model()
    cfg = pretrain.PretrainConfig(lr=1e-4, audio_lr=1e-5, text_lr=3e-5)
    opt = pretrain.build_optimizer(m, cfg, "cpu")
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in m.named_parameters():
        want = 3e-5 if name.startswith("text_encoder.") else 1e-5 if name.startswith("audio_encoder.") else 1e-4
        assert lr_of[id(p)] == want, name


def _released_gather_loss(x, y, logit_scale):
    """The released code's distributed loss, described in words (train_stage1.py): all_gather
    both embeddings under no_grad, put this rank's own tensors back in its slot (so they keep
    their graph), normalize, and take the symmetric CE over the whole B_global x B_global matrix."""
    import torch.distributed as dist
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered = []
    for local in (x, y):
        with torch.no_grad():
            slots = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(slots, local)
        slots[rank] = local
        gathered.append(F.normalize(torch.cat(slots), dim=-1))
    logits = logit_scale.exp() * gathered[0] @ gathered[1].T  # (B_global, B_global)
    labels = torch.arange(len(logits))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _released_gather_worker(rank, world, init_file, x_all, y_all, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    B = x_all.shape[0] // world
    sl = slice(rank * B, (rank + 1) * B)
    out = {}
    for form, loss_fn in (("ours", htcl.contrastive_loss), ("released", _released_gather_loss)):
        torch.manual_seed(0)
        net = torch.nn.Linear(x_all.shape[1], 6, dtype=torch.float64)  # same init on both ranks
        scale = torch.nn.Parameter(torch.tensor(2.6, dtype=torch.float64))
        loss_fn(net(x_all[sl]), net(y_all[sl]), scale).backward()
        grads = [net.weight.grad, net.bias.grad, scale.grad]
        for g in grads:  # what DDP does: average the gradients over processes
            dist.all_reduce(g)
            g /= world
        out[form] = grads
    torch.save(out, os.path.join(out_dir, f"released{rank}.pt"))
    dist.destroy_process_group()


def test_released_no_grad_gather_scales_the_embedding_gradient_by_one_over_world(tmp_path):
    """2 gloo processes: the released gather-under-no_grad form gives the single-process gradient
    divided by the world size for the network, and the full one for the logit scale; ours gives
    the single-process gradient for both."""
    world = 2
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, dtype=torch.float64, generator=g), torch.randn(8, 5, dtype=torch.float64, generator=g)
    torch.multiprocessing.spawn(_released_gather_worker, args=(world, str(tmp_path / "init"), x, y, str(tmp_path)),
                                nprocs=world)
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 6, dtype=torch.float64)
    scale = torch.nn.Parameter(torch.tensor(2.6, dtype=torch.float64))
    htcl.contrastive_loss(net(x), net(y), scale).backward()  # one process, whole batch
    full = [net.weight.grad, net.bias.grad, scale.grad]
    for rank in range(world):
        got = torch.load(tmp_path / f"released{rank}.pt", weights_only=True)
        for a, b in zip(got["ours"], full):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(got["released"][:2], full[:2]):
            torch.testing.assert_close(a, b / world, rtol=1e-10, atol=1e-12)
            assert (a - b).abs().max() > 0.1 * b.abs().max()  # really not the full gradient
        torch.testing.assert_close(got["released"][2], full[2], rtol=1e-10, atol=1e-12)
# --- similar-song search ---


@pytest.fixture(scope="module")
def search_world(tiny_world, tmp_path_factory):
    """Eight short, distinct songs, their catalog, and tiny_world's artifact; plus a copy of one
    song's file outside the catalog."""
    d = tmp_path_factory.mktemp("search")
    rng = np.random.default_rng(5)
    os.makedirs(d / "audio")
    rows = []
    for i in range(8):
        t = np.arange(int((1.5 + 0.25 * i) * 16000)) / 16000
        x = 0.3 * np.sign(np.sin(2 * np.pi * (150 + 90 * i) * t)) * (1 + np.sin(2 * np.pi * (0.5 + i) * t))
        sf.write(d / "audio" / f"s{i}.wav", (x + 0.02 * rng.standard_normal(len(t))).astype(np.float32), 16000)
        rows.append(f"s{i},audio/s{i}.wav,song {i},artist {i % 3},la la\n")
    (d / "catalog.csv").write_text("song_id,audio,title,artists,lyrics\n" + "".join(rows))
    import shutil
    shutil.copy(d / "audio" / "s3.wav", d / "my_song.wav")
    return {"dir": d, "catalog": str(d / "catalog.csv"), "model": str(tiny_world / "artifact")}


def _brute_force_top(keys, query, k, leave_out=None):
    """Song rows by descending cosine with a plain numpy loop."""
    cos = [float(np.dot(query, v) / np.linalg.norm(query) / np.linalg.norm(v)) for v in keys]
    order = [r for r in sorted(range(len(keys)), key=lambda r: -cos[r]) if r != leave_out]
    return order[:k], [cos[r] for r in order[:k]]


def _by_query(records):
    by = {}
    for r in records:
        by.setdefault(r["query"], []).append(r)
    return by


def test_search_finds_a_songs_own_file_first_and_a_song_id_leaves_itself_out(search_world, tmp_path):
    from data import load_catalog
    from model import load_artifact
    w = search_world
    model, tokenizer = load_artifact(w["model"])
    keys = embeddings.embed_catalog(model, tokenizer, load_catalog(w["catalog"]))["audio"]
    out = ev.main(["search", "--model", w["model"], "--catalog", w["catalog"], "--query",
                   str(w["dir"] / "my_song.wav"), "--query", "s5", "--k", "4", "--out", str(tmp_path / "r.csv")])
    by_query = _by_query(out)
    mine = by_query[str(w["dir"] / "my_song.wav")]
    assert mine[0]["song_id"] == "s3" and mine[0]["score"] > 0.9999  # a file outside the catalog, its twin first
    query = evsearch.embed_audio_files(model, [str(w["dir"] / "my_song.wav")])[0]
    assert np.allclose(query, keys[3], atol=1e-5)  # embedded as `embed` embeds its catalog twin
    rows, cos = _brute_force_top(keys, query, 4)
    assert [r["song_id"] for r in mine] == [f"s{r}" for r in rows]
    assert cos[0] - cos[1] > 1e-4, "the test needs a margin between the twin and the next song"
    s5 = by_query["s5"]
    rows, cos = _brute_force_top(keys, keys[5], 4, leave_out=5)
    assert [r["song_id"] for r in s5] == [f"s{r}" for r in rows]  # s5 itself is not among them
    assert np.allclose([r["score"] for r in s5], cos, atol=1e-5)
    assert [r["rank"] for r in s5] == [1, 2, 3, 4]
    assert s5[0]["title"] == f"song {rows[0]}" and s5[0]["artists"] == f"artist {rows[0] % 3}"
    with open(tmp_path / "r.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == ["query", "rank", "song_id", "score", "title", "artists"]
    assert [(r["query"], r["rank"], r["song_id"]) for r in written] == \
        [(r["query"], str(r["rank"]), r["song_id"]) for r in out]


def test_search_from_saved_embeddings_and_faiss_index_gives_the_model_s_results(search_world, tmp_path, capsys):
    w = search_world
    args = ["--catalog", w["catalog"], "--query", "s2", "--query", str(w["dir"] / "audio" / "s6.wav"), "--k", "3"]
    direct = ev.main(["search", "--model", w["model"], *args, "--out", str(tmp_path / "a.json")])
    emb = str(tmp_path / "emb")
    try:
        import faiss  # noqa: F401
        index = True
    except ImportError:  # faiss-cpu is optional: the exact path is still tested
        index = False
    ev.main(["embed", "--artifact", w["model"], "--catalog", w["catalog"], "--out", emb]
            + ["--index", "faiss"] * index)
    saved = ev.main(["search", "--emb", emb, "--model", w["model"], *args])
    key = lambda rs: [(r["query"], r["song_id"]) for r in rs]  # noqa: E731
    assert key(saved) == key(direct)
    assert np.allclose([r["score"] for r in saved], [r["score"] for r in direct], atol=1e-5)
    assert json.load(open(tmp_path / "a.json")) == direct  # --out .json: the same records
    if index:
        assert os.path.exists(os.path.join(emb, "audio.faiss"))
        capsys.readouterr()
        via = ev.main(["search", "--emb", emb, "--model", w["model"], *args, "--index", "faiss"])
        assert "building" not in capsys.readouterr().out  # the saved index was used
        assert key(via) == key(direct)
    only_ids = ev.main(["search", "--emb", emb, "--catalog", w["catalog"], "--query", "s2", "--k", "3"])
    assert key(only_ids) == key(direct)[:3]  # song-id queries need no model
    with pytest.raises(ValueError, match=r"s6.wav: an audio file; embedding it needs --model"):
        ev.main(["search", "--emb", emb, *args])


def test_search_query_that_is_both_file_and_song_id_or_neither_is_refused(search_world, tmp_path, monkeypatch):
    w = search_world
    monkeypatch.chdir(w["dir"] / "audio")  # here "s1.wav" is a file; make it a song id too
    with pytest.raises(ValueError, match=r"--query s1.wav: both a file and a song_id of c; write ./s1.wav"):
        evsearch.parse_queries(["s1.wav"], {"s1.wav": 0}, "c")
    assert evsearch.parse_queries(["./s1.wav", "id:s1.wav", "s2"], {"s1.wav": 0, "s2": 1}, "c") == \
        [("file", "./s1.wav"), ("song", "s1.wav"), ("song", "s2")]
    with pytest.raises(ValueError, match=r"--query s9: no such file, and no song_id 's9' in .*catalog.csv"):
        ev.main(["search", "--model", w["model"], "--catalog", w["catalog"], "--query", "s9"])
    with pytest.raises(ValueError, match=r"--out r.txt: .*\.csv or \.json"):
        ev.main(["search", "--model", w["model"], "--catalog", w["catalog"], "--query", "s1", "--out", "r.txt"])


def test_faiss_index_top_k_equals_exact_torch_top_k():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    keys = (rng.standard_normal((40, 16))[rng.integers(0, 40, 3000)]
            + 0.5 * rng.standard_normal((3000, 16))).astype(np.float32)
    queries = keys[:50] + 0.1 * rng.standard_normal((50, 16)).astype(np.float32)
    exclude = np.where(np.arange(50) % 2 == 0, np.arange(50), -1)  # half song-id queries, half files
    want_s, want_r = evsearch.search(queries, keys, 10, exclude)
    assert not (want_r == exclude[:, None]).any()
    for index in (evsearch.build_index(keys),  # exact: IndexFlatIP
                  evsearch.build_index(keys, approx_from=1000, nprobe=10_000)):  # IVF scanning every cell: exact too
        got_s, got_r = evsearch.search(queries, keys, 10, exclude, index)
        assert (got_r == want_r).all()
        assert np.allclose(got_s, want_s, atol=1e-5)
    ivf = evsearch.build_index(keys, approx_from=1000, nprobe=4)  # 64 cells, 4 scanned: approximate, most found
    got_s, got_r = evsearch.search(queries, keys, 10, exclude, ivf)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_r, want_r)])
    assert 0.5 < recall <= 1 and (got_s[got_r >= 0] <= want_s[:, :1].max() + 1e-5).all()


def test_matching_with_a_faiss_index_gives_the_exact_hit_rate(tmp_path, capsys):
    faiss = pytest.importorskip("faiss")
    emb = _write_world(tmp_path)
    c, e = str(tmp_path / "catalog.csv"), str(tmp_path / "e.npy")
    args = ["matching", "--catalog", c, "--emb", e, "--emb", "random:8", "--favourites",
            str(tmp_path / "favourites.csv"), "--triggers", "4", "--per_trigger", "3", "--list_size", "6"]
    exact = ev.main(args)
    faiss.write_index(evsearch.build_index(np.load(e)), str(tmp_path / "e.faiss"))  # rows in e.ids.txt's order
    capsys.readouterr()
    via = ev.main(args + ["--index", "faiss"])
    assert "other order" in capsys.readouterr().out  # not the catalog's order: rebuilt, not misread
    for name in ("e", "random:8"):
        assert via[name]["hr"] == exact[name]["hr"] and via[name]["users"] == exact[name]["users"] == 12
    assert 0 < exact["e"]["hr"] < 1 or exact["e"]["hr"] != exact["random:8"]["hr"]
    # catalog order: the saved index itself is used
    np.save(tmp_path / "c.npy", emb)
    (tmp_path / "c.ids.txt").write_text("".join(f"s{i}\n" for i in range(len(emb))))
    faiss.write_index(evsearch.build_index(emb), str(tmp_path / "c.faiss"))
    args[args.index(e)] = str(tmp_path / "c.npy")
    capsys.readouterr()
    assert ev.main(args + ["--index", "faiss"])["c"]["hr"] == exact["e"]["hr"]
    assert "other order" not in capsys.readouterr().out


def test_the_documented_python_search_snippet_runs_and_finds_a_songs_own_file(search_world, tmp_path, capsys):
    import textwrap
    w = search_world
    emb = str(tmp_path / "emb")
    ev.main(["embed", "--artifact", w["model"], "--catalog", w["catalog"], "--out", emb])
    doc = evsearch.__doc__.split("Similar songs from Python")[1].split("\n", 1)[1]
    snippet = textwrap.dedent("".join(line + "\n" for line in doc.splitlines() if line.startswith("  ")))
    readme = open(os.path.join(ROOT, "README.md")).read().split("**From Python**")[1]
    readme = readme.split("```python\n")[1].split("```")[0]
    for old, new in (("runs/demo/finetune/final", w["model"]), ("emb/htcl", emb), ("runs/demo/emb", emb),
                     ("my_song.wav", str(w["dir"] / "my_song.wav")), ("sample_data/catalog.csv", w["catalog"])):
        snippet, readme = snippet.replace(old, new), readme.replace(old, new)
    for code in (snippet, readme):
        capsys.readouterr()
        exec(compile(code, "snippet", "exec"), {})
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 8 and lines[0].split()[1:3] == ["s3", "song"]  # its twin first, 8 songs listed


def test_index_faiss_without_faiss_installed_says_how_to_install_it(search_world, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` meets where it is not installed
    with pytest.raises(ModuleNotFoundError, match="pip install faiss-cpu"):
        evsearch.build_index(np.ones((3, 4), dtype=np.float32))
    with pytest.raises(ModuleNotFoundError, match="--index faiss needs the optional package faiss-cpu"):
        ev.main(["search", "--model", search_world["model"], "--catalog", search_world["catalog"],
                 "--query", "s1", "--index", "faiss"])
    with pytest.raises(SystemExit, match="^Error: --index faiss needs the optional package faiss-cpu"):
        ev.cli(["search", "--model", search_world["model"], "--catalog", search_world["catalog"],
                "--query", "s1", "--index", "faiss"])  # the command line: one line, no traceback
# --- tests that catch real bugs ---
# Each test here, and each weak test tightened with them, was checked by making its bug by hand
# (README, Tests) and watching it fail; the bug made for each:
#   clamps_every_logit_scale     pretrain.train without net.clamp_logit_scales()
#   missing_or_renamed           load_artifact with strict=False and no key check
#   validation_runs_without      pretrain.validate without model.eval()
#   text_padding_does_not        mean pooling as h.mean(1), over the padding too
#   loss_weights_are_applied     stage2_loss ignoring w_af / w_at; finetune.py not passing --weight_*
#   stage2_losses_match_brute    L_af on the rec song's audio; L_at with the af temperature; released L_at on rec only
#   prepare_in_two_shards        SongDataset's "row" = index in the dataset, not the catalog row
#   cooccurrence                 a per-user cap that keeps nothing, or one pair too few
#   unseen_test_labels           accuracy over seen test labels only
#   retrieval_queries_tag_text   T2M query text without --template
#   cli_runs_every_protocol      retrieval's M2M ignoring --k
#   plot_histograms              the positives' histogram not drawn
#   stage2_trains_from_the_stage1  L_af on the rec song's audio (a full demo stage 2: L_af 1.12, L_aa 4.21)


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


def test_artifact_with_a_missing_or_renamed_weight_is_refused_naming_the_key(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    htcl.save_artifact(tiny_model(), AutoTokenizer.from_pretrained(TINY_BERT), tmp_path / "art")
    path = tmp_path / "art" / "model.safetensors"
    state = load_file(path)
    weight = state.pop("audio_proj.0.weight")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing.*audio_proj\.0\.weight"):
        htcl.load_artifact(tmp_path / "art")
    save_file({**state, "audio_projection.0.weight": weight}, path)  # renamed: one missing, one unknown
    with pytest.raises(ValueError, match=r"audio_proj\.0\.weight.*unexpected.*audio_projection\.0\.weight"):
        htcl.load_artifact(tmp_path / "art")


def _song_batches(n_batches=2, B=4):
    """Stage-1 batches (mel, padding_mask, tokens) of random songs, from _pair_batch's rec side."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_BERT)
    out = []
    for seed in range(n_batches):
        b = _pair_batch(tok, B=B, seed=seed)
        out.append({"mel": b["rec_mel"], "padding_mask": b["rec_padding_mask"], "tokens": b["rec_tokens"]})
    return out


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


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_text_padding_does_not_change_text_embedding(pooling):
    """A song's text embedding must not depend on the other texts in its batch (padding)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_BERT)
    m = tiny_model(text_pooling=pooling).eval()
    assert m.text_encoder.pooling == pooling
    short, long = "title: la; artists: lo", " ".join(["la lo li"] * 12)
    batch = tok([short, long], padding="longest", return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the short text is padded
    with torch.no_grad():
        together = m.encode_text(batch)
        for i, text in enumerate((short, long)):
            alone = m.encode_text(tok([text], return_tensors="pt"))
            torch.testing.assert_close(together[i:i + 1], alone, atol=2e-5, rtol=1e-4)


def _stage2_parts_by_brute_force(m, batch, use_trigger_text):
    """L_aa, L_af, L_at of Eq. 5 from each song's embeddings (each side encoded on its own),
    with brute_force_infonce's plain-Python double loop in place of model.contrastive_loss."""
    with torch.no_grad():
        trig_a = m.encode_audio(batch["trig_mel"], batch["trig_padding_mask"], normalize=False)
        rec_a = m.encode_audio(batch["rec_mel"], batch["rec_padding_mask"], normalize=False)
        trig_t = m.encode_text(batch["trig_tokens"], normalize=False)
        rec_t = m.encode_text(batch["rec_tokens"], normalize=False)
        trig_f, rec_f = m.fuse(trig_a, trig_t, normalize=False), m.fuse(rec_a, rec_t, normalize=False)
    s = {k: v.item() for k, v in m.logit_scale.items()}
    if use_trigger_text:  # released code: L_af both ways, L_at over both songs (batch 2B)
        af = 0.5 * (brute_force_infonce(trig_a, rec_f, s["af"]) + brute_force_infonce(rec_a, trig_f, s["af"]))
        at = brute_force_infonce(torch.cat([trig_a, rec_a]), torch.cat([trig_t, rec_t]), s["at"])
    else:  # paper: triplets <trigger audio, rec audio, rec text>
        af = brute_force_infonce(trig_a, rec_f, s["af"])
        at = brute_force_infonce(rec_a, rec_t, s["at"])
    miswired_af = brute_force_infonce(rec_a, rec_f, s["af"])  # the rec song's audio in place of the trigger's
    return {"aa": brute_force_infonce(trig_a, rec_a, s["aa"]), "af": af, "at": at}, miswired_af


@pytest.mark.parametrize("use_trigger_text", [False, True], ids=["paper", "released"])
def test_stage2_losses_match_brute_force_from_the_same_embeddings(use_trigger_text):
    from transformers import AutoTokenizer
    batch = _pair_batch(AutoTokenizer.from_pretrained(TINY_BERT), B=6, seed=3)
    m = tiny_model().eval()
    with torch.no_grad():  # three different temperatures, so swapping two of them shows
        for name, value in zip(("aa", "af", "at"), (1.5, 3.0, 4.0)):
            m.logit_scale[name].fill_(value)
    want, miswired_af = _stage2_parts_by_brute_force(m, batch, use_trigger_text)
    with torch.no_grad():
        loss, parts = m(batch, stage=2, use_trigger_text=use_trigger_text)
    for name in ("aa", "af", "at"):
        assert parts[name].item() == pytest.approx(want[name], rel=1e-4), (name, parts, want)
    assert loss.item() == pytest.approx(sum(want.values()), rel=1e-4)
    if not use_trigger_text:
        assert abs(miswired_af - want["af"]) > 0.05  # so a miswired L_af cannot pass the check above


def test_stage2_loss_weights_are_applied_in_the_model_and_by_finetune(tmp_path, monkeypatch):
    import finetune
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_BERT)
    batch = _pair_batch(tok, B=4, seed=1)
    m = tiny_model().eval()

    def weighted(parts):  # Eq. 5 with weights (0.5, 2, 3), from the unweighted parts
        return (0.5 * parts["aa"] + 2 * parts["af"] + 3 * parts["at"]).item()

    with torch.no_grad():
        for use_trigger_text in (False, True):
            _, parts = m(batch, stage=2, use_trigger_text=use_trigger_text)
            assert len({round(v.item(), 4) for v in parts.values()}) == 3  # distinct parts: a mix-up shows
            only_aa, _ = m(batch, stage=2, weights=(1.0, 0.0, 0.0), use_trigger_text=use_trigger_text)
            assert only_aa.item() == pytest.approx(parts["aa"].item(), rel=1e-6)
            mixed, _ = m(batch, stage=2, weights=(0.5, 2.0, 3.0), use_trigger_text=use_trigger_text)
            assert mixed.item() == pytest.approx(weighted(parts), rel=1e-6)
    # finetune.py passes --weight_* through to the loss it trains with
    htcl.save_artifact(m, tok, tmp_path / "art")
    captured = {}
    monkeypatch.setattr(finetune, "train", lambda cfg, model, tokenizer, loss_fn, *a, **k:
                        captured.update(model=model, loss_fn=loss_fn))
    finetune.main(["--init_from", str(tmp_path / "art"), "--catalog", os.path.join(SAMPLE, "catalog.csv"),
                   "--pairs", os.path.join(SAMPLE, "pairs.csv"), "--out_dir", str(tmp_path / "out"),
                   "--weight_aa", "0.5", "--weight_af", "2", "--weight_at", "3"])
    model = captured["model"].eval()
    with torch.no_grad():
        loss, parts = captured["loss_fn"](model, batch)
    assert loss.item() == pytest.approx(weighted(parts), rel=1e-6)
# --- the CrossMuSim training variant ---


def test_random_crop_has_the_crop_length_stays_inside_the_song_and_is_seeded():
    mel = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 3)  # row t holds t: a crop shows its start
    starts = []
    for seed in range(200):
        crop = data.random_crop(mel, 20, np.random.default_rng(seed))
        assert crop.shape == (20, 3)
        s = int(crop[0, 0])
        assert torch.equal(crop[:, 0], torch.arange(s, s + 20, dtype=torch.float32))  # contiguous
        assert 0 <= s <= 30
        starts.append(s)
        assert torch.equal(crop, data.random_crop(mel, 20, np.random.default_rng(seed)))  # same seed, same crop
    assert min(starts) == 0 and max(starts) == 30 and len(set(starts)) > 20  # every start reachable
    assert torch.equal(data.random_crop(mel[:12], 20, np.random.default_rng(0)), mel[:12])  # short song: whole
    assert data.seconds_to_frames(10) == embeddings.CHUNK_FRAMES == 104


def test_aspect_and_caption_samplers_draw_what_the_paper_describes():
    aspects = data.split_aspects(" rock, loud;guitar |raw, , energetic,fast ")
    assert aspects == ["rock", "loud", "guitar", "raw", "energetic", "fast"]
    sizes = set()
    for seed in range(300):
        words = data.sample_aspects(aspects, np.random.default_rng(seed), max_aspects=5).split(", ")
        assert 1 <= len(words) <= 5 and len(set(words)) == len(words) and set(words) <= set(aspects)
        sizes.add(len(words))
    assert sizes == {1, 2, 3, 4, 5}
    assert data.sample_aspects(["solo"], np.random.default_rng(0)) == "solo"
    sentences = data.split_sentences("A calm track. It has no vocals!  Good for sleep? yes")
    assert sentences == ["A calm track.", "It has no vocals!", "Good for sleep?", "yes"]
    seen = set()
    for seed in range(100):
        caption = data.sample_caption(sentences, np.random.default_rng(seed))
        n = next(i for i in range(1, 5) if caption == " ".join(sentences[:i]))  # always a block from the start
        seen.add(n)
    assert seen == {1, 2, 3, 4}


class _MemoryCache:
    """Stands in for data.MelCache: row r's mel is r + a ramp over its 40 frames."""
    cache_dir = "memory"

    def has(self, row):
        return True

    def mel(self, row):
        return torch.arange(40, dtype=torch.float32)[:, None].repeat(1, 4) + 1000 * row


def test_crossmusim_samples_one_per_text_type_fall_back_and_depend_only_on_seed_epoch_index(tmp_path):
    write_catalog(tmp_path / "c.csv", [
        ("a", "a.wav", "Ta", "Art", "line one\nline two\n\nline three", "rock, loud, raw", "Loud. Fast. Raw."),
        ("b", "b.wav", "Tb", "Art", "", "jazz", ""),            # aspects only
        ("c", "c.wav", "Tc", "Art", "", "", ""),                # nothing: its X_t
    ], header=("song_id", "audio", "title", "artists", "lyrics", "tags", "caption"))
    catalog = data.load_catalog(str(tmp_path / "c.csv"))
    ds = data.CrossMuSimDataset(catalog, [0, 1, 2], _MemoryCache(), crop_frames=17, seed=1, aspect_column="tags")
    assert [(r, t) for r, t, _ in ds.samples] == [(0, "aspects"), (0, "caption"), (0, "lyrics"), (1, "aspects"),
                                                 (2, "song")]
    assert ds.counts == {"aspects": 2, "caption": 1, "lyrics": 1, "song": 1}
    for k, (row, kind, _) in enumerate(ds.samples):
        item = ds[k]
        assert item["row"] == row and item["mel"].shape == (17, 4) and int(item["mel"][0, 0]) // 1000 == row
    assert ds[2]["text"] in ("line one", "line two", "line three")
    assert ds[4]["text"] == catalog[2].text
    # a catalog without the aspect column (the default name is absent here): no aspect samples
    no_aspects = data.CrossMuSimDataset(catalog, [0, 1, 2], _MemoryCache(), crop_frames=17)
    assert [t for _, t, _ in no_aspects.samples] == ["caption", "lyrics", "song", "song"]
    # sample k is a function of (seed, epoch, k): the same in a fresh copy, new in another epoch
    again = data.CrossMuSimDataset(catalog, [0, 1, 2], _MemoryCache(), crop_frames=17, seed=1, aspect_column="tags")
    def draws(d):
        return [(d[k]["text"], int(d[k]["mel"][0, 0])) for k in range(len(d))]
    first = draws(ds)
    assert draws(again) == first == draws(ds)
    changed = False
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        changed |= draws(ds) != first
    assert changed
    frozen = data.CrossMuSimDataset(catalog, [0, 1, 2], _MemoryCache(), crop_frames=17, seed=1, aspect_column="tags",
                                    redraw=False)
    frozen.set_epoch(5)  # held-out samples: epoch 0's draws at every pass
    assert draws(frozen) == first
    with pytest.raises(ValueError, match="text_types"):
        data.CrossMuSimDataset(catalog, [0], _MemoryCache(), text_types=("lyrics", "chorus"))


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


def test_cls_pooling_ignores_padding_and_differs_from_the_mean():
    torch.manual_seed(0)
    enc = htcl.AudioEncoder(tiny_audio_config(), pooling="cls").eval()
    mean_enc = htcl.AudioEncoder(tiny_audio_config()).eval()
    mean_enc.load_state_dict(enc.state_dict())
    song = torch.randn(1, 60, 128)
    padded = torch.cat([song, 5 * torch.randn(1, 40, 128)], 1)  # junk in the padding
    mask = torch.zeros(1, 100, dtype=torch.bool)
    mask[:, 60:] = True
    with torch.no_grad():
        alone = enc(song)
        torch.testing.assert_close(enc(padded, mask), alone, atol=2e-5, rtol=1e-4)
        assert (enc(padded) - alone).abs().max() > 1e-3  # without the mask the padding leaks into [CLS]
        assert (mean_enc(song) - alone).abs().max() > 1e-3  # the switch does change the pooling
    with pytest.raises(ValueError, match="audio_pooling"):
        htcl.AudioEncoder(tiny_audio_config(), pooling="max")


def test_artifact_trained_for_chunks_is_embedded_by_chunks_of_its_length_by_default(tiny_world, tmp_path):
    from data import load_catalog, song_mel
    d = tiny_world
    model, tokenizer = htcl.load_artifact(str(d / "artifact"))
    model.cfg.embed_mode, model.cfg.chunk_seconds = "chunked", 2.5
    htcl.save_artifact(model, tokenizer, str(tmp_path / "art"))
    catalog = load_catalog(d / "catalog.csv")
    ev.main(["embed", "--artifact", str(tmp_path / "art"), "--catalog", str(d / "catalog.csv"),
             "--out", str(tmp_path / "emb"), "--batch_size", "2"])
    assert json.loads((tmp_path / "emb" / "meta.json").read_text())["mode"] == "chunked"
    got = np.load(tmp_path / "emb" / "audio.npy")
    for r in range(3):  # hand loop over the song's 26-frame (2.5 s) windows
        mel = song_mel(catalog[r].audio)
        starts = [s for s in range(0, len(mel), 26) if s == 0 or len(mel) - s >= data.MIN_FRAMES]
        with torch.no_grad():
            chunks = [model.encode_audio(mel[s:s + 26][None], normalize=False)[0] for s in starts]
        np.testing.assert_allclose(got[r], F.normalize(torch.stack(chunks).mean(0), dim=0).numpy(), atol=1e-5)
    ev.main(["embed", "--artifact", str(tmp_path / "art"), "--catalog", str(d / "catalog.csv"),
             "--out", str(tmp_path / "full"), "--mode", "full"])  # an explicit --mode wins
    full = np.load(tmp_path / "full" / "audio.npy")
    assert json.loads((tmp_path / "full" / "meta.json").read_text())["mode"] == "full"
    assert not np.allclose(full[0], got[0], atol=1e-3)


def test_exclude_same_drops_the_querys_group_from_positives_and_candidates_like_brute_force():
    rng = np.random.default_rng(7)
    n = 60
    tags = rng.choice(["rock", "jazz", "folk", ""], n)
    artists = rng.choice(["p", "q", "r", "s", "t", ""], n)
    emb = rng.standard_normal((n, 5))
    sims = _unit(emb) @ _unit(emb).T
    k = 8
    aps, counts = [], []
    for q in range(n):
        allowed = [j for j in range(n) if j != q and (artists[q] == "" or artists[j] != artists[q])]
        order = sorted(allowed, key=lambda j: -sims[q, j])[:k]
        if artists[q] != "":
            counts.append(sum(artists[j] == artists[q] for j in order))
        if tags[q] == "":
            continue
        n_rel = sum(tags[j] == tags[q] for j in allowed)
        if n_rel == 0:
            continue
        hits, total = 0, 0.0
        for i, j in enumerate(order):
            if tags[j] == tags[q]:
                hits += 1
                total += hits / (i + 1)
        aps.append(total / min(k, n_rel))
    got, nq = crossmusim.music_to_music_map(emb, tags, k=k, batch_size=7, exclude_same=artists)
    assert nq == len(aps) and got == pytest.approx(np.mean(aps))
    plain, _ = crossmusim.music_to_music_map(emb, tags, k=k)
    assert plain != pytest.approx(got)  # the control changes the score on this case
    sa = crossmusim.same_artist_stats(emb, artists, k=k, exclude_same=artists)
    assert sa["share_with_same_artist"] == 0 and sum(counts) == 0
    # hand-made: a (artist x) has its twin b (also x) closest and c (artist y) next, both rock
    e = np.array([[1, 0], [0.99, 0.1], [0.9, 0.4], [0, 1]])
    t, a = ["rock", "rock", "rock", "jazz"], ["x", "x", "y", "z"]
    assert crossmusim.music_to_music_map(e, t, k=2)[0] == pytest.approx(1.0)
    # with x excluded: query a's only positive is c (rank 1): AP 1; b likewise; c's positives a, b: AP 1
    # and d (jazz) has no positive: not a query
    assert crossmusim.music_to_music_map(e, t, k=2, exclude_same=a) == (pytest.approx(1.0), 3)
    e2 = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.3, 0.95]])  # now c sits far from a and b; d is closer to them
    t2, a2 = ["rock", "rock", "jazz", "rock"], ["x", "x", "y", "z"]
    # query a, candidates c, d (b excluded): d (rock) ranks first: AP 1. Query d: candidates a, b, c, with
    # c first (jazz), then b, a: hits at ranks 2 and 3 -> (1/2 + 2/3) / 2
    res = crossmusim.music_to_music_map(e2, t2, k=3, exclude_same=a2)
    assert res[1] == 3 and res[0] == pytest.approx((1 + 1 + (1 / 2 + 2 / 3) / 2) / 3)
# --- artist-graph protocol ---


def _artist_world(n=60, seed=8, p=0.15):
    rng = np.random.default_rng(seed)
    split = rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2])
    edges = rng.integers(0, n, (int(p * n * n / 2), 2))  # one direction each, self-loops and repeats included
    return split, edges


def test_message_passing_graphs_follow_the_released_splits_and_stored_direction():
    split, edges = _artist_world()
    stored = {(i, j) for i, j in edges.tolist() if i != j}
    pairs = lambda t: set(map(tuple, t.T.tolist()))  # noqa: E731
    for undirected in (False, True):
        g = artist_graph.message_passing_graphs(edges, split, undirected)
        kept = stored | {(j, i) for i, j in stored} if undirected else stored
        s = lambda i, j: {split[i], split[j]}  # noqa: E731
        assert pairs(g["train"]) == {e for e in kept if s(*e) == {"train"}}
        assert pairs(g["val"]) == {e for e in kept if s(*e) in ({"train"}, {"train", "val"})}
        assert pairs(g["test"]) == {e for e in kept if s(*e) != {"test"}}
        for name in ("train", "val", "test"):  # the ground truth never passes a message
            a, b = split[g[name][0].numpy()], split[g[name][1].numpy()]
            assert not ((a == "test") & (b == "test")).any()
        both = stored | {(j, i) for i, j in stored}
        assert pairs(g["truth_test"]) == {e for e in both if s(*e) == {"test"}}
        assert pairs(g["truth_val"]) == {e for e in both if s(*e) == {"val"}}
        assert pairs(g["pairs"]) == {e for e in both if s(*e) == {"train"}}
        symmetric = all((j, i) in pairs(g["test"]) for i, j in pairs(g["test"]))
        assert symmetric == undirected  # stored one way each: messages flow first column -> second only


def test_sage_layer_is_the_projected_mean_over_in_neighbours_then_l2():
    layer = artist_graph.SAGEConv(3)
    h = torch.randn(4, 3)
    edges = torch.tensor([[1, 2, 0, 3], [0, 0, 1, 1]])  # 0 <- {1, 2}, 1 <- {0, 3}; 2 and 3 receive nothing
    adj, _ = artist_graph.local_graph(edges, torch.arange(4), 4)
    proj = torch.relu(layer.project(h))
    mean = torch.stack([(proj[1] + proj[2]) / 2, (proj[0] + proj[3]) / 2, torch.zeros(3), torch.zeros(3)])
    expect = F.normalize(layer.lin_l(mean) + layer.lin_r(h), dim=1)
    assert torch.allclose(layer(h, adj), expect, atol=1e-6)


def test_zero_layers_is_the_encoder_then_the_head():
    torch.manual_seed(0)
    model = artist_graph.ArtistGNN(5, n_layers=0, hidden=8, out_dim=4).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.encoder[1].running_mean.uniform_(-1, 1)
        model.encoder[1].running_var.uniform_(0.5, 2)
    x = torch.randn(7, 5)
    lin, bn = model.encoder
    h = (x @ lin.weight.T + lin.bias - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    h1 = torch.relu(h @ model.head[0].weight.T + model.head[0].bias)
    out = (h1 @ model.head[2].weight.T + model.head[2].bias) @ model.head[3].weight.T + model.head[3].bias
    g1, _ = artist_graph.local_graph(torch.tensor([[0, 1, 2], [1, 2, 3]]), torch.arange(7), 7)
    assert torch.allclose(model(x, g1), F.normalize(out, dim=1), atol=1e-5)
    assert torch.allclose(model(x, None), model(x, g1))
    deep = artist_graph.ArtistGNN(5, n_layers=2, hidden=8, out_dim=4).eval()
    assert not torch.allclose(deep(x, g1), deep(x, artist_graph.local_graph(torch.tensor([[4], [0]]), torch.arange(7), 7)[0]))


def test_forward_over_the_receptive_field_equals_the_full_graph():
    split, edges = _artist_world(n=80, seed=3, p=0.04)
    g = artist_graph.message_passing_graphs(edges, split)
    x = torch.randn(80, 6)
    targets = np.flatnonzero(split == "test")
    model = artist_graph.ArtistGNN(6, n_layers=2, hidden=8, out_dim=4).eval()
    full = model(x, artist_graph.local_graph(g["test"], torch.arange(80), 80)[0])[targets]
    assert len(artist_graph.receptive_nodes(g["test"], targets, 2, 80)) < 80  # something was left out
    assert torch.allclose(artist_graph.embed_artists(model, x, g["test"], targets, 2), full, atol=1e-5)
    assert not torch.allclose(artist_graph.embed_artists(model, x, g["test"], targets, 1), full, atol=1e-3)


def test_negatives_are_never_the_anchor_or_a_neighbour_and_cover_the_rest():
    split, edges = _artist_world(n=30, seed=5, p=0.3)
    pairs = artist_graph.message_passing_graphs(edges, split)["pairs"]
    candidates = torch.as_tensor(np.flatnonzero(split == "train"))
    neighbours = {i: {j for a, j in pairs.T.tolist() if a == i} for i in range(30)}
    anchors = pairs[0].repeat(200)
    neg = artist_graph.sample_negatives(anchors, pairs, candidates, 30, torch.Generator().manual_seed(0))
    drawn = {}
    for a, n in zip(anchors.tolist(), neg.tolist()):
        assert n != a and n not in neighbours[a] and split[n] == "train"
        drawn.setdefault(a, set()).add(n)
    for a in drawn:  # uniform over the allowed ones: with 200+ draws each, every one shows up
        allowed = set(candidates.tolist()) - neighbours[a] - {a}
        assert drawn[a] == allowed


def _tiny_graph_cfg(**kw):
    return artist_graph.ArtistGraphConfig(hidden=16, out_dim=8, steps_per_epoch=2, **kw)


def test_plateau_schedule_steps_on_the_validation_loss():
    split, edges = _artist_world(n=50, seed=2, p=0.2)
    g = artist_graph.message_passing_graphs(edges, split)
    x = artist_graph.artist_features("random", split, dim=12)
    cfg = _tiny_graph_cfg(epochs=12, lr=0.3, plateau_patience=1, min_lr=1e-3)
    _, hist = artist_graph.train_artist_gnn(x, g, split, 1, cfg)
    # ReduceLROnPlateau's rule (mode min, relative threshold 1e-4), replayed on the logged val losses
    lr, best, bad, expect = cfg.lr, float("inf"), 0, [cfg.lr]
    for v in hist["val_loss"][:-1]:
        best, bad = (v, 0) if v < best * (1 - 1e-4) else (best, bad + 1)
        if bad > cfg.plateau_patience:
            lr, bad = max(lr * cfg.plateau_factor, cfg.min_lr), 0
        expect.append(lr)
    assert hist["lr"] == pytest.approx(expect)
    assert len(set(hist["lr"])) > 1  # the schedule did step in this run


def test_same_seed_same_result_and_early_stop_truncates_the_run():
    split, edges = _artist_world(n=50, seed=4, p=0.2)
    x = artist_graph.artist_features("random", split, dim=12)
    cfg = _tiny_graph_cfg(epochs=4)
    a = artist_graph.artist_graph_ndcg(x, edges, split, layers=(1,), k=10, cfg=cfg)
    b = artist_graph.artist_graph_ndcg(x, edges, split, layers=(1,), k=10, cfg=cfg)
    c = artist_graph.artist_graph_ndcg(x, edges, split, layers=(1,), k=10, seeds=(1,), cfg=cfg)
    assert a == b and a != c
    stopped = artist_graph.artist_graph_ndcg(x, edges, split, layers=(1,), k=10, cfg=_tiny_graph_cfg(epochs=30, early_stop=1))
    assert stopped[1]["epochs"][0] < 30


def test_ndcg_both_formulas_hand_worked():
    # eval artists on a line at 0, 1, 3, 6; artist 0 ranks 1, 2, 3 (1 is nearest)
    z = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    one = artist_graph.artist_ndcg(z, torch.tensor([[0, 1], [1, 0]]))  # artist 0 - 1: each finds the other first
    assert one["queries"] == 2 and one["ndcg"] == pytest.approx(1.0)
    assert one["ndcg_released"] == pytest.approx(1 / (1 + 1 / math.log2(3)))  # ~0.613
    # artist 0 with two relevant neighbours, 1 (rank 1) and 3 (rank 3); 1 and 3 each have one
    two = artist_graph.artist_ndcg(z, torch.tensor([[0, 0, 1, 3], [1, 3, 0, 0]]))
    q0_std = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    q0_rel = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    # artist 1 ranks 0 (d 1) then 2 (d 2): 0 at rank 1; artist 3 ranks 2 (d 3), 1 (d 5), 0 (d 6): rank 3
    q1_std, q1_rel = 1.0, 1 / (1 + 1 / math.log2(3))
    q3_std, q3_rel = 1 / math.log2(4), (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert two["ndcg"] == pytest.approx((q0_std + q1_std + q3_std) / 3)
    assert two["ndcg_released"] == pytest.approx((q0_rel + q1_rel + q3_rel) / 3)


def test_graph_layers_recover_hidden_edges_from_random_features():
    """Communities: with random features only message passing can place eval artists."""
    rng = np.random.default_rng(9)
    n, groups = 150, 6
    group = rng.integers(0, groups, n)
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < (0.3 if group[i] == group[j] else 0.005)]
    split = rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2])
    x = artist_graph.artist_features("random", split, dim=16)
    cfg = artist_graph.ArtistGraphConfig(hidden=32, out_dim=16, epochs=6, undirected=True)
    table = artist_graph.artist_graph_ndcg(x, edges, split, "test", layers=(0, 2), k=50, cfg=cfg)
    assert table[2]["ndcg@50"][0] > table[0]["ndcg@50"][0] + 0.15, table
    assert table[2]["ndcg@50_released_formula"][0] < table[2]["ndcg@50"][0]


def test_artist_graph_cli_reports_both_formulas_and_every_flag_acts(tmp_path, capsys, monkeypatch):
    _write_world(tmp_path)
    args = ["artist-graph", "--edges", str(tmp_path / "artist_graph.csv"), "--artist_split",
            str(tmp_path / "artist_split.csv"), "--features", "random", "--layers", "1", "--epochs", "2",
            "--k", "5", "--hidden", "16", "--out_dim", "8", "--random_dim", "6"]
    out = ev.main(args)
    table = capsys.readouterr().out
    assert "random ndcg@5 |" in table and "random ndcg@5_released_formula" in table
    assert set(out["random"]["1"]) >= {"ndcg@5", "ndcg@5_released_formula"}
    assert out["random"]["1"]["ndcg@5_released_formula"][0] < out["random"]["1"]["ndcg@5"][0]
    assert ev.main(args + ["--undirected"])["random"]["1"] != out["random"]["1"]
    seen = {}
    real = embeddings.song_embeddings
    monkeypatch.setattr(embeddings, "song_embeddings", lambda *a, **kw: seen.setdefault("args", a) and real(*a, **kw))
    ev.main(args + ["--features", "mean", "--catalog", str(tmp_path / "catalog.csv"), "--emb",
                    str(tmp_path / "e.npy"), "--batch_size", "7"])
    assert seen["args"][-1] == 7  # --batch_size reaches the on-the-fly embedding of an --emb


def test_random_artist_features_are_the_released_uniform_2613_d_and_seeded():
    x = artist_graph.artist_features("random", ["a"] * 40)
    assert x.shape == (40, 2613) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() < 1 and abs(x.mean() - 0.5) < 0.01  # uniform [0, 1), not Gaussian
    assert np.array_equal(x, artist_graph.artist_features("random", ["b"] * 40))
    assert not np.array_equal(x, artist_graph.artist_features("random", ["a"] * 40, seed=1))
# --- own songs offline, clean errors, consistent evaluation options, fast report, curves ---

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


def test_paths_on_the_command_line_stay_relative_to_the_working_directory(tmp_path):
    import pretrain
    import training
    preset = tmp_path / "p.toml"
    preset.write_text('[pretrain]\ncatalog = "c.csv"\ncache = "/abs/cache"\n[pretrain.model]\n'
                      'text_model = "bert-base-uncased"\n')
    cfg = training.parse_config(pretrain.PretrainConfig, "pretrain", ["--preset", str(preset), "--out_dir", "o"])
    assert cfg.catalog == str(tmp_path / "c.csv") and cfg.cache == "/abs/cache" and cfg.out_dir == "o"
    assert cfg.model.text_model == "bert-base-uncased"  # no such folder beside the preset: a hub name


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


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_no_arguments_print_the_demo_command_without_a_traceback(script, capsys, monkeypatch):
    stage = importlib.import_module(script)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.raises(SystemExit) as e:
        stage.main([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"accelerate launch {script}.py --preset sample_data/preset.toml" in err and len(err.splitlines()) <= 5
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` sets
    with pytest.raises(SystemExit) as e:
        stage.main([])
    assert e.value.code == 0  # accelerate would print its own traceback over any other status


def test_evaluate_cli_refuses_a_pickled_npy_naming_the_file(tmp_path):
    _write_world(tmp_path)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([{"a": 1}] * 40, dtype=object), allow_pickle=True)
    (tmp_path / "bad.ids.txt").write_text("".join(f"s{i}\n" for i in range(40)))
    for argv in (["probe", "--catalog", str(tmp_path / "catalog.csv"), "--emb", str(bad)],
                 ["artist-graph", "--edges", str(tmp_path / "artist_graph.csv"), "--artist_split",
                  str(tmp_path / "artist_split.csv"), "--features", str(bad)]):
        with pytest.raises(SystemExit) as e:
            ev.cli(argv)
        assert str(e.value.code).startswith(f"Error: {bad}: not a plain numeric .npy"), e.value.code


def test_artifact_whose_config_disagrees_with_its_weights_names_folder_and_parameter(tiny_world, tmp_path):
    import shutil
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_world / "artifact", folder)
    config = json.loads((folder / "config.json").read_text())
    config["proj_dims"] = [12, 6]  # the weights were saved with (12, 8)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"^{folder}: config.json disagrees .*parameter \S+proj\S+ has shape"):
        htcl.load_artifact(str(folder))
    with pytest.raises(SystemExit) as e:
        ev.cli(["embed", "--artifact", str(folder), "--catalog", str(tiny_world / "catalog.csv"),
                "--out", str(tmp_path / "emb")])
    assert str(e.value.code).startswith(f"Error: {folder}: config.json disagrees")


def test_unknown_config_keys_get_one_message_top_level_or_nested():
    for bad, key in (({"bogus": 1}, "bogus"), ({"audio": {"layerz": 2}}, "audio.layerz")):
        with pytest.raises(ValueError, match=rf"^x/config.json: unknown HTCLConfig keys: \['{key}'\]$"):
            htcl.HTCLConfig.from_dict(bad, source="x/config.json")
    assert htcl.HTCLConfig.from_dict({"audio": {"layers": 3}}).audio.layers == 3


def test_ids_file_with_bom_and_spaces_is_read_as_catalogs_are(tmp_path):
    from data import load_catalog
    emb = _write_world(tmp_path)
    catalog = load_catalog(tmp_path / "catalog.csv")
    ids = (tmp_path / "e.ids.txt").read_text().splitlines()
    (tmp_path / "e.ids.txt").write_bytes(b"\xef\xbb\xbf" + "".join(f" {i}\t\n" for i in ids).encode())
    x = embeddings.song_embeddings(str(tmp_path / "e.npy"), catalog)
    assert np.array_equal(x, emb)  # every song found, in catalog order


def test_self_pairs_are_dropped_and_counted(tmp_path):
    from data import load_catalog
    _write_world(tmp_path)
    catalog = load_catalog(tmp_path / "catalog.csv")
    (tmp_path / "p.csv").write_text("trigger_song_id,rec_song_id\ns1,s2\ns3,s3\ns4, s4\ns2,s5\n")
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 rows pairing a song with itself; first on line\(s\) 3, 4"):
        pairs = data.load_pairs(tmp_path / "p.csv", catalog)
    assert pairs == [(1, 2), (2, 5)]


def test_matching_chance_is_a_probability_even_on_small_catalogs():
    assert ev.matching_chance(42) == 1.0  # 12 non-trigger songs, all fit on a list of 100
    assert ev.matching_chance(1030) == pytest.approx(100 / 1000)
    assert ev.matching_chance(100, n_triggers=3, per_trigger=10) == pytest.approx(30 / 97)  # 30 candidates at most


def test_probe_and_report_draw_the_same_random_split_without_a_split_column(tmp_path, capsys):
    _write_world(tmp_path)
    rows = (tmp_path / "catalog.csv").read_text().splitlines()
    (tmp_path / "nosplit.csv").write_text("\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    out = ev.main(["probe", "--catalog", str(tmp_path / "nosplit.csv"), "--emb", str(tmp_path / "e.npy"),
                   "--label", "genre", "--seeds", "2", "--epochs", "1"])
    note = "has no 'split' column: each seed holds out its own seeded random 20% of songs as test"
    assert note in capsys.readouterr().out
    from data import load_catalog
    catalog = load_catalog(tmp_path / "nosplit.csv")
    direct = ev.run_probe(embeddings.song_embeddings(str(tmp_path / "e.npy"), catalog),
                          [catalog.label(r, "genre") for r in range(len(catalog))], None, seeds=range(2), epochs=1)
    assert out["e/genre"]["per_seed_acc"] == direct["per_seed_acc"]  # report calls run_probe with split None too
    assert ev.probe_split(catalog)[0] is None and note in ev.probe_split(catalog)[1]


def test_every_option_of_every_sub_command_has_help_and_shows_its_default():
    parser = ev.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert len(subparsers.choices) >= 9
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help text"
        if any(a.default not in (None, argparse.SUPPRESS) for a in sub._actions if a.dest != "help"):
            assert "(default: " in sub.format_help(), name


def test_flags_are_underscored_and_the_old_dashed_spellings_still_parse():
    parser = ev.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        flags = [f for a in sub._actions for f in a.option_strings if f.startswith("--") and f != "--no-reuse"]
        assert not [f for f in flags if "-" in f[2:]], name  # --help shows only the underscore spellings
    args = parser.parse_args(["artist-graph", "--edges", "e", "--artist-split", "s", "--features", "random",
                              "--out-dim", "8", "--early-stop=3"])
    assert (args.artist_split, args.out_dim, args.early_stop) == ("s", 8, 3)
    args = parser.parse_args(["report", "--catalog", "c", "--emb", "x", "--ranking-seeds", "0", "--no-reuse"])
    assert (args.ranking_seeds, args.reuse) == (0, False)


def test_probes_trained_side_by_side_match_probes_trained_alone():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.standard_normal(120) > 0).astype(int) + (x[:, 1] > 1)
    x_test = rng.standard_normal((200, 6)).astype(np.float32)
    together = ev.train_probes(x, y, x_test, 3, seeds=(0, 1, 2), hidden=16, min_steps=60)
    for seed, pred in zip((0, 1, 2), together):
        alone = ev.train_probe(x, y, x_test, 3, seed=seed, hidden=16, min_steps=60)
        assert (pred == alone).mean() >= 0.98  # equal up to float rounding
    assert (together[0] != together[1]).any()  # and the seeds do differ


def test_din_forward_equals_the_concatenated_activation_unit():
    torch.manual_seed(0)
    din = ev.DIN(torch.randn(30, 8))
    target = torch.randint(30, (5,))
    history = torch.randint(30, (5, 7))
    history[:, :3] = -1  # three leading columns padding in every row: dropped by forward
    history[1, 3:5] = -1
    history[2] = -1  # no history at all: interest 0
    pad = history < 0
    t = din.items(target)
    h = din.items(history.masked_fill(pad, 30))
    te = t[:, None, :].expand_as(h)
    weight = din.attention(torch.cat([h, te, h - te, h * te], dim=-1)).squeeze(-1).masked_fill(pad, 0.0)
    interest = (weight[..., None] * h).sum(1)
    reference = din.head(torch.cat([interest, t, interest * t], dim=-1)).squeeze(-1)
    assert torch.allclose(din(target, history), reference, atol=1e-5)


def test_audio_only_artifact_gives_the_same_audio_embeddings_without_bert(tiny_world):
    """load_artifact(text=False) skips BERT: no text weights read, no BERT module imported, and
    the audio embeddings equal the full model's."""
    d = tiny_world
    full, _ = htcl.load_artifact(d / "artifact")
    audio, tok = htcl.load_artifact(d / "artifact", text=False)
    assert tok is None and audio.text_encoder is None
    assert not any(k.startswith("text_encoder.") for k in audio.state_dict())
    mel = torch.randn(3, 120, 128)
    with torch.no_grad():
        assert torch.equal(full.encode_audio(mel), audio.encode_audio(mel))
    with pytest.raises(RuntimeError, match="loaded for audio only"):
        audio.encode_text({"input_ids": torch.ones(1, 3, dtype=torch.long)})
    # embedding a catalog's audio needs neither BERT nor a tokenizer (a fresh process), and gives
    # what the full model gives
    code = (f"import sys, numpy as np, data; from evals import embeddings; cat = data.load_catalog({str(d / 'catalog.csv')!r}); "
            f"np.save(sys.argv[1], embeddings.song_embeddings({str(d / 'artifact')!r}, cat)); "
            "print('transformers.models.bert.modeling_bert' in sys.modules)")
    out = d / "audio_only.npy"
    p = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines()[-1] == "False", p.stdout
    from data import load_catalog
    want = embeddings.embed_catalog(full, _, load_catalog(d / "catalog.csv"))["audio"]
    assert np.allclose(np.load(out), want, atol=1e-6)


def test_pair_dataset_leaves_out_texts_no_loss_reads(tiny_world):
    from data import load_catalog
    catalog = load_catalog(tiny_world / "catalog.csv")
    both = data.PairDataset(catalog, [(0, 1)])[0]
    rec = data.PairDataset(catalog, [(0, 1)], texts=("rec",))[0]
    none = data.PairDataset(catalog, [(0, 1)], texts=())[0]
    assert both["trig_text"] == catalog[0].text and both["rec_text"] == catalog[1].text
    assert "trig_text" not in rec and rec["rec_text"] == catalog[1].text
    assert not any(k.endswith("_text") for k in none) and torch.equal(none["rec_mel"], both["rec_mel"])


def test_curve_plotter_draws_every_row_once_training_ends_and_never_raises(tmp_path, monkeypatch):
    import threading

    import training
    log = tmp_path / "log.jsonl"
    seen, gate = [], threading.Event()

    def slow_plot(log_path, png_path):  # the first draw waits until rows were added behind it
        gate.wait(10)
        seen.append(len(open(log_path).read().split("\n")[:-1]))

    monkeypatch.setattr(training, "plot_curves", slow_plot)
    plotter = training.CurvePlotter(str(log), str(tmp_path / "c.png"))
    log.write_text('{"step": 1}\n')
    plotter.request()
    for step in (2, 3):  # two requests while the first draw runs: folded into one more draw
        with open(log, "a") as f:
            f.write(f'{{"step": {step}}}\n')
        plotter.request()
    gate.set()
    plotter.close()
    assert seen[-1] == 3 and len(seen) == 2, seen
    said = []
    monkeypatch.setattr(training, "plot_curves", lambda *a: 1 / 0)
    broken = training.CurvePlotter(str(log), str(tmp_path / "c.png"), say=said.append)
    for _ in range(3):
        broken.request()
        broken.close()
    assert len(said) == 1 and "ZeroDivisionError" in said[0]


def test_small_catalog_preset_is_valid_and_reads_paths_from_its_folder():
    import finetune
    import pretrain
    import training
    preset = os.path.join(ROOT, "presets", "small.toml")
    cfg = training.parse_config(pretrain.PretrainConfig, "pretrain", ["--preset", preset])
    assert cfg.catalog == os.path.join(ROOT, "my_songs", "catalog.csv") and cfg.global_batch == 16
    assert cfg.model.text_model == "../models/bert-base-multilingual-uncased"  # no such folder here: kept as given
    cfg = training.parse_config(finetune.FinetuneConfig, "finetune", ["--preset", preset])
    assert cfg.init_from == os.path.join(ROOT, "runs", "mine", "pretrain", "final")


def test_report_to_tensorboard_without_the_package_says_how_to_install_it(monkeypatch):
    import training
    assert training._trackers("none") is None
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        training._trackers("tensorboard")
