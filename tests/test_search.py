"""Tests of evals/search.py's display: digits that separate the scores, the model's name.

    python -m pytest -q tests/test_search.py
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from own_songs import TINY_BERT, write_songs  # noqa: E402

import evaluate as ev  # noqa: E402
import model as htcl  # noqa: E402
from evals.search import score_digits  # noqa: E402


def test_score_digits_separate_close_scores_and_stay_at_four_otherwise():
    assert score_digits([0.51, 0.73, 0.2]) == 4
    close = [1.0, 0.99971, 0.9997, 0.99968]  # gaps of 1e-5 and 2e-5: five decimals tell them apart
    d = score_digits(close)
    assert d == 5 and len({f"{s:.{d}f}" for s in close}) == 4 and len({f"{s:.4f}" for s in close}) < 4
    assert score_digits([0.5, 0.5 + 1e-12]) == 7  # float32 holds no more


def test_search_names_the_model_and_prints_distinct_scores_of_a_collapsed_model(tmp_path, capsys):
    from transformers import AutoTokenizer
    catalog = write_songs(str(tmp_path), n=8)
    torch.manual_seed(0)
    cfg = htcl.HTCLConfig(audio=htcl.AudioConfig(conv_channels=16, hidden=16, layers=1, heads=2, ffn=32,
                                                 pos_conv_kernel=5, pos_conv_groups=2),
                          text_model=TINY_BERT, text_pretrained=False, proj_dims=(12, 8), fusion_dims=(8, 8))
    model = htcl.HTCL(cfg)
    with torch.no_grad():  # collapsed: one shared direction, a little variation in another
        model.audio_proj[-1].weight.mul_(0.02)
        model.audio_proj[-1].bias.zero_()
        model.audio_proj[-1].bias[0] = 1.0
    artifact = tmp_path / "runs" / "mymodel" / "final"
    htcl.save_artifact(model, AutoTokenizer.from_pretrained(TINY_BERT), str(artifact))
    records = ev.main(["search", "--model", str(artifact), "--catalog", catalog, "--query", "s1", "--k", "7"])
    out = capsys.readouterr().out
    assert f"search: model mymodel ({artifact})" in out
    scores = np.array([r["score"] for r in records])
    assert scores.min() > 0.999 and len({f"{s:.4f}" for s in scores}) < 7  # alike at four decimals ...
    printed = [line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| ") and "rank" not in line]
    assert len(printed) == 7 and len(set(printed)) == 7, printed  # ... told apart here
