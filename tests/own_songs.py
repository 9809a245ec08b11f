"""A tiny song world for the tests of the own-songs path (tests/test_baselines.py, test_pretrain.py,
test_training.py, test_finetune.py): WAV tones with a catalog (train / val / test split, genre,
album), its log-mel cache, and a tiny stage-1 run through pretrain.main. Not a test file.
"""
import os

import numpy as np
import soundfile as sf

import data
from tests.helpers import TINY_BERT

# Tiny towers for pretrain.main: seconds on one core.
TINY_FLAGS = ["--model.text_model", TINY_BERT, "--no-model.text_pretrained", "--model.text_pooling", "mean",
              "--model.audio.conv_channels", "16", "--model.audio.hidden", "16", "--model.audio.layers", "1",
              "--model.audio.heads", "2", "--model.audio.ffn", "32", "--model.audio.pos_conv_kernel", "5",
              "--model.audio.pos_conv_groups", "2", "--model.proj_dims", "12", "8", "--model.fusion_dims", "8", "8",
              "--num_workers", "0", "--log_every", "1"]


def split_of(i):
    return "test" if i % 5 == 0 else "val" if i % 5 == 1 else "train"


def write_songs(folder, n=20, seconds=2.0, seed=0):
    """n songs: noisy tones, two genres at different pitches, albums of 2 songs. -> catalog path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    lines = ["song_id,audio,title,artists,lyrics,genre,language,album,split\n"]
    t = np.arange(int(seconds * 16000)) / 16000
    for i in range(n):
        freq = (220 if i % 2 else 660) * (1 + 0.05 * rng.random())
        x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(os.path.join(folder, "audio", f"s{i}.wav"), x.astype(np.float32), 16000)
        lines.append(f"s{i},audio/s{i}.wav,song {i},artist {i % 3},la la {i},{'low' if i % 2 else 'high'},en,"
                     f"al{i // 2},{split_of(i)}\n")
    path = os.path.join(folder, "catalog.csv")
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def write_world(folder, **kw):
    """write_songs + its log-mel cache -> (catalog path, cache folder)."""
    catalog = write_songs(folder, **kw)
    cache = os.path.join(folder, "cache")
    data.prepare(catalog, cache)
    return catalog, cache


def stage1_argv(catalog, cache, out_dir, *flags):
    """pretrain.main's arguments for a 1-epoch tiny run on the world."""
    return ["--catalog", catalog, "--cache", cache, "--out_dir", str(out_dir), "--epochs", "1",
            "--global_batch", "4", "--batch_per_device", "4", *TINY_FLAGS, *flags]
