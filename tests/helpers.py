"""Helpers shared by test_smoke.py and tests/test_*.py: the repo's paths, a tiny HTCL model, the
brute-force InfoNCE of Eq. 2-4, random pair batches, tiny catalogs and evaluation worlds, and the
command-line runner the end-to-end tests use. Fixtures are in tests/conftest.py.

    from tests.helpers import tiny_model, brute_force_infonce   # in a test file
"""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch

import model as htcl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "sample_data")
TINY_BERT = os.path.join(SAMPLE, "tiny-bert")
# the demo preset; absolute, so that in-process parse_config finds it from any working directory
PRESET = os.path.join(ROOT, "sample_data", "preset.toml")
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


def _stage_loss(m, batch, stage):
    if stage == 1:
        b = {"mel": batch["rec_mel"], "padding_mask": batch["rec_padding_mask"], "tokens": batch["rec_tokens"]}
        return m(b, stage=1)[0]
    return m(batch, stage=2, use_trigger_text=True)[0]


def tone(seconds, sr=16000, freq=440.0, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_catalog(path, rows, header=("song_id", "audio", "title", "artists", "lyrics")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


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


def run(*cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


def read_log(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def demo_cache_in(tmp_path_factory):
    """The demo's mel cache of sample_data (data.py prepare, as sample_data/demo.sh runs it), built
    once a session in pytest's base folder: test_smoke.py and tests/ both read it, neither writes."""
    cache = tmp_path_factory.getbasetemp() / "demo-cache"
    done = tmp_path_factory.getbasetemp() / "demo-cache.done"
    if not done.exists():
        run(sys.executable, "data.py", "prepare", "--catalog", "sample_data/catalog.csv", "--cache", cache)
        done.touch()
    return cache


def save_tiny_artifact(folder, seed=0, **cfg):
    """A tiny HTCL artifact (8-d embeddings) on TINY_BERT's tokenizer; cfg: HTCLConfig fields
    (embed_mode, chunk_seconds). Different seeds, different weights."""
    from transformers import AutoTokenizer
    torch.manual_seed(seed)
    config = htcl.HTCLConfig(audio=htcl.AudioConfig(conv_channels=16, hidden=16, layers=1, heads=2, ffn=32,
                                                    pos_conv_kernel=5, pos_conv_groups=2),
                             text_model=TINY_BERT, text_pretrained=False, proj_dims=(12, 8), fusion_dims=(8, 8),
                             **cfg)
    htcl.save_artifact(htcl.HTCL(config), AutoTokenizer.from_pretrained(TINY_BERT), str(folder))
    return str(folder)


def sample_songs_cache(tmp, n):
    """The first n songs of sample_data in a catalog (no split column, so the seeded 90/10 split)
    and its log-mel cache under `tmp` -> (catalog path, cache folder)."""
    import data
    with open(os.path.join(SAMPLE, "catalog.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    path = tmp / "catalog.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["song_id", "audio", "title", "artists", "lyrics"])
        w.writerows([[r["song_id"], os.path.join(SAMPLE, r["audio"]), r["title"], r["artists"], r["lyrics"]]
                     for r in rows])
    data.prepare(str(path), str(tmp / "cache"))
    return path, tmp / "cache"
