"""Fixtures shared by tests/test_*.py: one thread a test, a tiny artifact on real audio files
(tiny_world), and the demo's cache and full-length stage-1 and stage-2 runs on sample_data (built
once a session, the way sample_data/demo.sh runs them). Plain helpers are in tests/helpers.py.

    OMP_NUM_THREADS=1 python -m pytest -q tests/
"""
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo's modules and tests.helpers, from any working directory

import model as htcl  # noqa: E402
from tests.helpers import PRESET, demo_cache_in, run  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread buys nothing and, on a busy 2-core machine,
    waiting for it can make a test 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """The demo's mel cache of sample_data (640 songs), built once a session (test_smoke.py shares it)."""
    return demo_cache_in(tmp_path_factory)


@pytest.fixture(scope="session")
def stage1(tmp_path_factory, demo_cache):
    out = tmp_path_factory.mktemp("pretrain")
    run(sys.executable, "pretrain.py", "--preset", PRESET, "--cache", demo_cache, "--out_dir", out)  # the demo's run
    return out


@pytest.fixture(scope="session")
def stage2(tmp_path_factory, stage1, demo_cache):
    out = tmp_path_factory.mktemp("finetune")
    log = run(sys.executable, "finetune.py", "--preset", PRESET, "--cache", demo_cache,
              "--init_from", stage1 / "final", "--out_dir", out)  # the demo's stage 2
    assert "init_from" in log
    return out
