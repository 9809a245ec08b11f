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
