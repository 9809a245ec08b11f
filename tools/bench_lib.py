"""The measuring kit of bench.py (its rows, report and command line stay there): wall-time medians,
peak resident memory of a window, thread and machine facts, the analytic FLOPs count behind MFU
(Sec. 3.1.1 sizes: the 12 x 768 audio encoder on 1251 frames, BERT-base on 512 tokens), and the
synthetic paper-size inputs (120 s, 44.1 kHz stereo songs with long lyrics, in a mel cache) and
the demo world's cache that the rows share through Context.

    python bench.py --help     # nothing to run here by itself
"""
import contextlib
import csv
import importlib.util
import io
import os
import platform
import statistics
import time

import numpy as np
import soundfile as sf
import soxr
import torch

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("make_world", os.path.join(ROOT, "sample_data", "make_world.py"))
world_gen = importlib.util.module_from_spec(_spec)  # the synthetic world's generator: its songs, its words
_spec.loader.exec_module(world_gen)

PRESET = os.path.join(ROOT, "sample_data", "preset.toml")
TINY_BERT = os.path.join(ROOT, "sample_data", "tiny-bert")
# Dense bf16 tensor-core peak FLOP/s per GPU (vendor data sheets); MFU is reported against these.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# -----------------------------------------------------------------------------
# Measuring: wall time, medians, memory.


def median_time(fn, warmup, iters):
    """Median wall seconds of fn() over `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _proc_status_mb(key):
    """VmRSS / VmHWM of this process in MB, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory above the level at entry, in MB (CPU).

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so the peak
    is the peak of this window only. Where that is not allowed, the process-lifetime peak
    (ru_maxrss) is used, which is why the training-step variants each run in a fresh process.
    Freed memory that the allocator keeps is not visible here: inside a long-lived process a
    window can under-report; in a fresh process it cannot.
    """

    def __enter__(self):
        self.base = _proc_status_mb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.mb = None
        return self

    def __exit__(self, *exc):
        peak = _proc_status_mb("VmHWM")
        if peak is None:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
        self.mb = None if self.base is None else max(0.0, peak - self.base)


@contextlib.contextmanager
def torch_threads(n):
    """Run the block on n intra-op threads (None: leave as is)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads(n):
    return f"{n} thread" + ("s" if n != 1 else "")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# Analytic FLOPs (matmuls and convolutions; 2 FLOPs per multiply-add). Norms, softmax, GELU
# and the loss are left out: they are memory-bound and small next to the matmuls.


def transformer_flops(tokens, hidden, ffn, layers):
    """Forward FLOPs of `layers` encoder layers over `tokens` tokens."""
    per_layer = (2 * tokens * hidden * 3 * hidden       # Q, K, V projections
                 + 2 * 2 * tokens * tokens * hidden     # Q K^T and (attention) V, all heads together
                 + 2 * tokens * hidden * hidden         # output projection
                 + 2 * 2 * tokens * hidden * ffn)       # FFN up and down
    return layers * per_layer


def mlp_flops(dims):
    return sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def flops_per_sample(cfg, text_len, frames=data.MAX_FRAMES, text_config=None, train=True):
    """FLOPs of one song through both towers and heads: forward, x3 with the backward (train).

    cfg: model.HTCLConfig; text_config: the text model's transformers config (None: audio only).
    Paper size, forward: ~29 GFLOPs for the audio tower on 1251 frames, ~97 for BERT-base on 512
    tokens. With gradient checkpointing the hardware recomputes a forward (x4); MFU counts x3.
    """
    a = cfg.audio
    f, t, c_in = 0, frames, a.n_mels
    for k, s in zip(a.conv_kernels, a.conv_strides):  # conv stem, no padding
        t = (t - k) // s + 1
        f += 2 * c_in * a.conv_channels * k * t
        c_in = a.conv_channels
    f += 2 * t * a.conv_channels * a.hidden                                   # feature projection
    f += 2 * t * a.hidden * (a.hidden // a.pos_conv_groups) * a.pos_conv_kernel  # grouped positional conv
    f += transformer_flops(t + 1, a.hidden, a.ffn, a.layers)                  # + [CLS]
    f += mlp_flops((a.hidden, *cfg.proj_dims))
    if text_config is not None:
        h = text_config.hidden_size
        f += transformer_flops(text_len, h, text_config.intermediate_size, text_config.num_hidden_layers)
        f += 2 * h * h                                                        # pooler, on [CLS] only
        f += mlp_flops((h, *cfg.proj_dims))
    return 3 * f if train else f


def gpu_peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# -----------------------------------------------------------------------------
# Inputs: synthetic 120 s songs, a mel cache of them, and the demo world's cache.


def write_songs(folder, n, seed=0):
    """n synthetic 120 s songs (world_gen.synth_audio) as 44.1 kHz stereo 16-bit wav and flac, alternating.
    -> [(path, "wav" | "flac")]."""
    rng = np.random.default_rng(seed)
    genres, languages = list(world_gen.GENRES), list(world_gen.LANGUAGES)
    out = []
    for i in range(n):
        x = world_gen.synth_audio(rng, genres[i % len(genres)], languages[i % len(languages)], i % 7, 120.0)
        y = soxr.resample(x, data.SAMPLE_RATE, 44100)
        fmt = ("wav", "flac")[i % 2]
        path = os.path.join(folder, f"song{i:03d}.{fmt}")
        sf.write(path, np.stack([y * 1.1, y * 0.9], 1).clip(-1, 1), 44100, subtype="PCM_16")
        out.append((path, fmt))
    return out


def long_lyrics(rng, words=700):
    """Lyrics long enough that BERT's 512-token limit truncates them, as for most real songs."""
    vocab = [w for ws in world_gen.GENRE_WORDS.values() for w in ws] + world_gen.GENERIC_WORDS
    return " ".join(rng.choice(vocab, words))


def write_catalog(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["song_id", "audio", "title", "artists", "lyrics"])
        w.writerows(rows)


def build_cache(catalog_path, cache_dir):
    """data.prepare into cache_dir, its print kept out of the table -> (Catalog, MelCache, counts)."""
    with contextlib.redirect_stdout(io.StringIO()):
        counts = data.prepare(catalog_path, cache_dir)
    catalog = data.load_catalog(catalog_path)
    return catalog, data.MelCache.open(cache_dir, catalog), counts


class Context:
    """Inputs shared by the rows, each built on first use in one temporary folder."""

    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self._songs = self._paper = self._demo = None

    @property
    def songs(self):
        if self._songs is None:
            folder = os.path.join(self.tmp, "songs")
            os.makedirs(folder)
            self._songs = write_songs(folder, self.args.songs)
        return self._songs

    @property
    def paper(self):
        """The synthetic 120 s songs, with long texts, in a cache: (catalog, cache, prepare counts)."""
        if self._paper is None:
            rng = np.random.default_rng(1)
            path = os.path.join(self.tmp, "paper_catalog.csv")
            write_catalog(path, [[f"p{i:03d}", p, f"Song {i}", "Synthetic Artist", long_lyrics(rng)]
                                 for i, (p, _) in enumerate(self.songs)])
            self._paper = build_cache(path, os.path.join(self.tmp, "paper_cache"))
        return self._paper

    @property
    def demo(self):
        """The first args.demo_songs songs of sample_data in a cache: (catalog, cache, prepare counts)."""
        if self._demo is None:
            src = os.path.join(ROOT, "sample_data", "catalog.csv")
            with open(src, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))[: self.args.demo_songs]
            path = os.path.join(self.tmp, "demo_catalog.csv")
            write_catalog(path, [[r["song_id"], os.path.join(ROOT, "sample_data", r["audio"]), r["title"],
                                  r["artists"], r["lyrics"]] for r in rows])
            self._demo = build_cache(path, os.path.join(self.tmp, "demo_cache"))
        return self._demo


def demo_config():
    """The demo preset's PretrainConfig, the tiny BERT's path made absolute."""
    import pretrain
    import training
    cfg = training.parse_config(pretrain.PretrainConfig, "pretrain", ["--preset", PRESET])
    cfg.model.text_model = TINY_BERT
    return cfg


def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY_BERT)
