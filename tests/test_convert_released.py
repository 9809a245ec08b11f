"""Tests of tools/convert_released.py and tools/released_reference.py: the released AudioModel's
keys and initial weights, and a released checkpoint converted to an artifact that gives the
released forward's embeddings and temperatures (or a clean error for a key it cannot place).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_convert_released.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import model as htcl
from tools import convert_released, released_reference

from tests.helpers import ROOT, TINY_BERT, run, tiny_audio_config


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
