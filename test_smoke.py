"""Smoke test: the contracts CI must never lose: the paper's 88,500,511 audio-encoder parameters,
1,251 frames for 120 s of audio, InfoNCE equal to a brute-force loop, and an artifact that
round-trips bit for bit. The thorough tests, one file a module, are in tests/.

    python -m pytest -q test_smoke.py tests
"""
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # the repo's modules and tests.helpers, from any working directory

import data  # noqa: E402
import model as htcl  # noqa: E402
from tests.helpers import TINY_BERT, brute_force_infonce, tiny_model, tone  # noqa: E402

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

