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


@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model-3.pth"
    torch.save(released_model_parts(1)[1], path)
    return path


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def _convert(*args):
    """tools/convert_released.py's command line, in this process -> (exit status, its error text)."""
    import contextlib
    import io
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            convert_released.main([str(a) for a in args])
    except SystemExit as e:  # argparse: code 2, its message on stderr; main: the message is the code
        code = e.code if isinstance(e.code, int) else 1
        return _Result(code, err.getvalue() + ("" if isinstance(e.code, int) else str(e.code)))
    return _Result(0, err.getvalue())


def test_the_fusion_mlp_filled_in_for_a_stage1_checkpoint_is_seeded(stage1_ckpt, tmp_path):
    """Bug checked (made by hand): without the seed the fresh fusion MLP changed with the global
    RNG, so two conversions of one checkpoint gave different fused embeddings."""
    fused = []
    for i, noise in enumerate((1, 2)):
        torch.manual_seed(noise)  # whatever drew from the global RNG before
        out = convert_released.convert_released(stage1_ckpt, TINY_BERT, str(tmp_path / f"a{i}"), heads=2)
        model, _ = convert_released.load_artifact(out)
        fused.append({k: v for k, v in model.state_dict().items() if k.startswith("fusion.")})
    assert fused[0] and all(torch.equal(fused[0][k], fused[1][k]) for k in fused[0])
    other = convert_released.convert_released(stage1_ckpt, TINY_BERT, str(tmp_path / "b"), heads=2, seed=1)
    weights = convert_released.load_artifact(other)[0].state_dict()
    assert not torch.equal(weights["fusion.0.weight"], fused[0]["fusion.0.weight"])  # the seed decides them


def test_out_holding_other_files_is_refused_and_an_artifact_replaced_only_with_overwrite(stage1_ckpt, tmp_path):
    """Bug checked: a non-empty --out was written into, and its foreign files stayed inside the artifact."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _convert(stage1_ckpt, "--text_model", TINY_BERT, "--out", out, "--heads", 2, "--overwrite")
    assert r.returncode == 1 and "not empty and not an artifact (notes.txt); give a new or empty folder" in r.stderr
    assert sorted(os.listdir(out)) == ["notes.txt"]
    fresh = tmp_path / "fresh"
    assert _convert(stage1_ckpt, "--text_model", TINY_BERT, "--out", fresh, "--heads", 2).returncode == 0
    before = (fresh / "model.safetensors").read_bytes()
    r = _convert(stage1_ckpt, "--text_model", TINY_BERT, "--out", fresh, "--heads", 2)
    assert r.returncode == 1 and "holds an artifact already; pass --overwrite" in r.stderr
    r = _convert(tmp_path / "missing.pth", "--text_model", TINY_BERT, "--out", fresh, "--heads", 2, "--overwrite")
    assert r.returncode == 1 and (fresh / "model.safetensors").read_bytes() == before  # a failure keeps the old one
    assert not os.path.exists(str(fresh) + ".converting")
    assert _convert(stage1_ckpt, "--text_model", TINY_BERT, "--out", fresh, "--heads", 2, "--overwrite").returncode == 0


@pytest.mark.parametrize("flag", [["--heads", "0"], ["--heads", "-2"], ["--conv_strides", "2", "0", "2"]])
def test_heads_and_strides_must_be_positive(stage1_ckpt, tmp_path, flag):
    r = _convert(stage1_ckpt, "--text_model", TINY_BERT, "--out", tmp_path / "o", *flag)
    assert r.returncode == 2 and f"argument {flag[0]}: expected a positive integer" in r.stderr
