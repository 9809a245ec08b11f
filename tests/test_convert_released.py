"""Tests of tools/convert_released.py's output folder and the parts it fills in: --out is never
mixed with other files, and the fresh fusion MLP of a stage-1 checkpoint is seeded. Run from the
repo root:

    python -m pytest -q tests/test_convert_released.py
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from test_smoke import released_model_parts  # noqa: E402  (the released modules at a tiny size)
from tools import convert_released  # noqa: E402

TINY_BERT = os.path.join(ROOT, "sample_data", "tiny-bert")


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
