"""Speed at paper scale: the HTCL pipeline against the authors' design and against the hardware.

What it measures, stage by stage, on synthetic inputs of the paper's sizes (nothing is downloaded):

  data      songs/s: decode + resample + log-mel of 120 s, 44.1 kHz stereo wav and flac files,
            data.song_mel (one torch thread, as `data.py prepare` runs it) next to the
            straightforward librosa pipeline (optional, bench-only dependency), in the same run
  loader    samples/s out of the memory-mapped log-mel cache (built with data.prepare) through a
            DataLoader with data.Collator (tokenization included), demo and paper sizes
  shards    samples/s and MB/s of stage 1's streaming loader (shards.loader_report): paper-size samples
            from local tar shards, cold page cache and warm, and from a local S3 server, against one H200
  step      samples/s and peak memory of one stage-1 training step (forward + backward + Adam) at
            the demo preset and at the paper configuration (12 x 768 audio encoder on 1251 frames,
            BERT-base-multilingual-sized text tower on 512 tokens), with variants: fp32 / bf16
            autocast, SDPA / plain attention math, gradient checkpointing, torch.compile, and the
            released code's straightforward nn.TransformerEncoder as the reference; FLOPs/sample
            from an analytic count and MFU on a GPU
  memory    peak memory of the paper-size step at the paper's per-GPU batch of 100 (800 / 8), fp32 /
            bf16, with and without gradient checkpointing: run at 100 on a GPU, extrapolated from
            batches 1 and 3 on a CPU; does it fit an 80 GB GPU?
  embed     songs/s of evals.embeddings.embed_catalog, full song and 10 s chunks, demo and paper encoders
  matching  seconds of evaluate.matching_benchmark (HR@100, on CPU) against songs and users; the
            sizes not run are extrapolated from those run, and marked so
  search    similar-song search at 100k and 1M synthetic songs (D 100): exact top-k in torch and
            the FAISS index evals.search.build_index makes (faiss-cpu; skipped without it): build
            seconds, query latency (a batch, and one query at a time), recall@10 against exact
  artist    seconds per epoch of evals.artist_graph.train_artist_gnn (the released artist-graph protocol) at
            1 and 4 layers on a synthetic graph of OLGA's size (olga_like_graph), and the 0-4 layer
            x 200-epoch sweep extrapolated from them (--rows artist: ~10 min on a busy machine)

Each step variant runs in its own process, so that its peak memory is its own. Prints one table,
then the ratios against the targets, and writes both as JSON. The measuring kit (timing, peak
memory, the FLOPs count, the synthetic inputs) is tools/bench_lib.py; the rows and the report are here.

    python bench.py --quick                      # CI-sized, under ~2 min (no memory or artist rows)
    python bench.py --out bench.json             # the full run, ~20 min on 2 busy CPU cores
    python bench.py --rows step,embed --device cuda
    python bench.py --librosa_python /tmp/libvenv/bin/python   # librosa from another venv
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import model as htcl  # noqa: E402
from tools.bench_lib import (TINY_BERT, Context, PeakRSS, cpu_model, demo_config, flops_per_sample,  # noqa: E402
                             gpu_peak_flops, load_average, long_lyrics, median_time, sync, threads, tokenizer,
                             torch_threads, write_catalog)
from tools.released_reference import ReferenceAudioEncoder  # noqa: E402  (the released design, for A/B rows)

# bert-base-multilingual-uncased's architecture (Sec. 3.1.3), built from its config with random
# weights, so the paper-size text tower costs what the real one costs without a download.
BERT_BASE_MULTILINGUAL = dict(model_type="bert", vocab_size=105879, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512)

ALL_ROWS = ("data", "loader", "shards", "step", "memory", "embed", "matching", "search", "artist")


# -----------------------------------------------------------------------------
# Rows. Each returns a list of row dicts: name, config, rate, unit, peak_mb, notes (+ extras).


def row(name, config, rate, unit, peak_mb=None, notes="", **extra):
    return {"name": name, "config": config, "rate": rate, "unit": unit, "peak_mb": peak_mb, "notes": notes, **extra}


LIBROSA_WORKER = r"""
import json, sys, time
import numpy as np, librosa
groups, reps = json.loads(sys.argv[1]), int(sys.argv[2])
def pipeline(path):
    y, _ = librosa.load(path, sr=16000)  # decode, downmix, resample (soxr_hq)
    S = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=2048, hop_length=1536, n_mels=128)
    return librosa.power_to_db(S, ref=np.max, top_db=80)
times = {}
for fmt, paths in groups.items():
    pipeline(paths[0])  # warm-up: numba JIT, lazy imports, page cache
    times[fmt] = []
    for _ in range(reps):
        for p in paths:
            t = time.perf_counter(); pipeline(p); times[fmt].append(time.perf_counter() - t)
print("BENCH_RESULT " + json.dumps({"version": librosa.__version__, "times": times}))
"""


def bench_data(ctx):
    groups = {fmt: [p for p, f in ctx.songs if f == fmt] for fmt in ("wav", "flac")}
    reps = 1 if ctx.args.songs >= 6 else 2
    python = ctx.args.librosa_python or sys.executable
    # Two rounds, ours then librosa each time, and the faster round of each counts: the two are
    # compared under the same neighbours' load rather than a minute apart.
    ours, theirs, decode, mem_mb, version, why = {}, {}, {}, {}, None, None
    for _ in range(2):
        with torch_threads(1):  # data.prepare decodes on one intra-op thread (more spin on such small STFTs)
            for fmt, paths in groups.items():
                # the decoder alone (libsndfile, as load_audio calls it): the floor both pipelines share
                t = [median_time(lambda: _decode_only(p), 1, reps) for p in paths]
                decode[fmt] = min(decode.get(fmt, float("inf")), statistics.median(t))
                data.song_mel(paths[0])  # warm-up: mel filter bank, page cache
                times = []
                with PeakRSS() as mem:
                    for _ in range(reps):
                        for p in paths:
                            t = time.perf_counter()
                            data.song_mel(p)
                            times.append(time.perf_counter() - t)
                ours[fmt] = min(ours.get(fmt, float("inf")), statistics.median(times))
                mem_mb[fmt] = mem.mb
        proc = subprocess.run([python, "-c", LIBROSA_WORKER, json.dumps(groups), str(reps)],
                              capture_output=True, text=True, cwd=ROOT)
        result = _result_line(proc.stdout)
        if result is None:
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            continue
        version = result["version"]
        for fmt, times in result["times"].items():
            theirs[fmt] = min(theirs.get(fmt, float("inf")), statistics.median(times))
    n = reps * len(groups["wav"])
    rows = [row(f"data/ours/{fmt}", "data.song_mel, 1 torch thread", 1 / ours[fmt], "songs/s", mem_mb[fmt],
                f"120 s 44.1 kHz stereo {fmt}; median of {n}, faster of 2 rounds", key=f"data_ours_{fmt}")
            for fmt in groups]
    rows += [row(f"data/decode/{fmt}", "soundfile read only (libsndfile, as data.load_audio)", 1 / decode[fmt],
                 "songs/s", None, "same files; the decoder both pipelines call, so librosa's time over this "
                 "bounds ours / librosa", key=f"data_decode_{fmt}") for fmt in groups]
    if not theirs:
        rows.append(row("data/librosa", "skipped", None, "songs/s",
                        notes=f"librosa not usable with {python} ({why}); `pip install librosa` to compare "
                              f"(bench-only), or --librosa_python PATH", key="data_librosa"))
    for fmt, seconds in theirs.items():
        rows.append(row(f"data/librosa/{fmt}", f"librosa {version} load+melspectrogram+power_to_db", 1 / seconds,
                        "songs/s", None, f"same files; median of {n}, faster of 2 rounds; own process "
                        f"({python})", key=f"data_librosa_{fmt}"))
    # end to end as a user runs it: decode every song into the cache (memmap writes included)
    _, _, counts = ctx.paper
    rows.append(row("data/prepare", "data.prepare, num_workers 0", len(ctx.songs) / max(counts["seconds"], 1e-9),
                    "songs/s", None, f"{len(ctx.songs)} songs into a fresh cache, one process",
                    key="data_prepare"))
    return rows


def _decode_only(path):
    with sf.SoundFile(path) as f:
        return data.read_prefix(f)


def _result_line(stdout):
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return None


class _WithoutText(torch.utils.data.Dataset):
    """A dataset's items without their text: the collator then does no tokenization."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, k):
        return {key: v for key, v in self.dataset[k].items() if key != "text"}


def loader_rate(dataset, collate, batch_size, num_workers, batches):
    """(samples/s at steady state, seconds to the first batch) of a shuffled DataLoader.

    Workers fill their prefetch queues (2 batches each) while the first batch is awaited, and
    those come out at once; the rate is taken over the `batches` batches after them.
    """
    skip = 1 + 2 * num_workers
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch_size * (skip + batches),
                                             generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, collate_fn=collate,
                                         num_workers=num_workers)
    t = time.perf_counter()
    it = iter(loader)
    next(it)  # worker start-up and the first batch: paid once per epoch (once per run when persistent)
    first = time.perf_counter() - t
    for _ in range(skip - 1):
        next(it)
    t = time.perf_counter()
    for _ in it:
        pass
    return batch_size * batches / (time.perf_counter() - t), first


def bench_loader(ctx):
    quick, rows = ctx.args.quick, []
    tok = tokenizer()
    collate = data.Collator(tok, 512)
    catalog, cache, _ = ctx.demo
    songs = list(range(len(catalog)))
    cached = data.SongDataset(catalog, songs, cache)
    decoded = data.SongDataset(catalog, songs, None)
    B = demo_config().batch_per_device
    n = 6 if quick else 12
    workers = 2
    variants = [  # (key, dataset, workers, what)
        ("loader_demo", cached, 0, "memmap cache, workers 0 (the preset)"),
        ("loader_demo_workers", cached, workers, f"memmap cache, workers {workers}"),
        ("loader_demo_notext", _WithoutText(cached), 0, "memmap cache, workers 0, no text (no tokenization)"),
        ("loader_demo_decode", decoded, 0, "decode audio on the fly, workers 0"),
        ("loader_demo_decode_workers", decoded, workers, f"decode audio on the fly, workers {workers}"),
    ]
    for key, dataset, w, what in variants:
        with PeakRSS() as mem, torch_threads(1):  # as sample_data/demo.sh runs it
            rate, first = loader_rate(dataset, collate, B, w, n if "decode" not in key else n // 3)
        rows.append(row("loader/demo", what, rate, "samples/s", mem.mb if w == 0 else None,  # workers: not ours
                        f"batch {B}, {len(catalog)} sample_data songs, 1 torch thread; first batch {first:.2f} s",
                        key=key))

    catalog, cache, _ = ctx.paper
    paper = data.SongDataset(catalog, list(range(len(catalog))), cache)
    B, n = 100, 3 if quick else 6  # Sec. 3.1.3: 100 songs per GPU
    for key, w, n_threads in (("loader_paper", 0, None), ("loader_paper_1thread", 0, 1),
                              ("loader_paper_workers", workers, None)):
        with PeakRSS() as mem, torch_threads(n_threads):  # DataLoader workers run on 1 thread anyway
            rate, first = loader_rate(paper, collate, B, w, n)
        what = f"memmap cache, workers {w}" + (f", {threads(n_threads)}" if n_threads else "")
        rows.append(row("loader/paper", what, rate, "samples/s", mem.mb if w == 0 else None,
                        f"batch {B} x 1251 frames, 512-token texts (tiny-BERT WordPiece); "
                        f"{len(catalog)} distinct songs sampled with replacement (page cache warm); "
                        f"first batch {first:.2f} s", key=key))
    return rows


def bench_shards(ctx):
    """Stage 1's loader from tar shards (shards.loader_report): local cold / warm, a local S3 server."""
    import shards
    rng, path = np.random.default_rng(2), os.path.join(ctx.tmp, "shard_catalog.csv")
    write_catalog(path, [[f"q{i:05d}", f"q{i:05d}.wav", f"Song {i}", "Synthetic Artist", long_lyrics(rng)]
                         for i in range(400 if ctx.args.quick else 1600)])  # 128 / 512 MB of shards
    return [row(**r) for r in shards.loader_report(path, os.path.join(ctx.tmp, "shards"), tokenizer())]


# --- training step: one process per variant --------------------------------------------------


def demo_batches(ctx, folder):
    """Two collated demo batches (batch_per_device songs each) and the first one padded to 512 tokens,
    saved for the step workers -> path."""
    tok = tokenizer()
    catalog, cache, _ = ctx.demo
    dataset = data.SongDataset(catalog, list(range(len(catalog))), cache)
    B = demo_config().batch_per_device
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    items = [[dataset[k] for k in order[i * B:(i + 1) * B]] for i in range(2)]
    collate = data.Collator(tok, 512)
    first, second = collate(items[0]), collate(items[1])
    # the second batch a few frames shorter, as the next training batch usually is (torch.compile row)
    T = second["mel"].shape[1] - 8
    second = dict(second, mel=second["mel"][:, :T].contiguous(),
                  padding_mask=second["padding_mask"][:, :T].contiguous())
    padded = dict(first, tokens=dict(tok([it["text"] for it in items[0]], padding="max_length", truncation=True,
                                         max_length=512, return_tensors="pt")))
    path = os.path.join(folder, "demo_batches.pt")
    torch.save({"batch": first, "other": second, "padded512": padded}, path)
    return path


def step_variants(args):
    """(key, spec) of every training-step variant this run measures."""
    quick = args.quick
    # On a shared machine a neighbour's burst can slow a whole process several-fold, every phase
    # alike (seen: 8x at paper size, 40x for the demo on 2 threads), so the variants that are compared
    # run in `rounds` separate processes, interleaved, and the fastest counts. Under such load, paper-
    # size ratios within ~1.3x of 1 are not resolved: every process's rate is listed in its notes.
    # The demo runs on one intra-op thread (sample_data/demo.sh sets OMP_NUM_THREADS=1), so it is measured so.
    demo = dict(preset="demo", arch="ours", amp="fp32", attn="sdpa", ckpt=False, compile=False, text="longest",
                threads=1, warmup=3, iters=5 if quick else 10, rounds=1 if quick else 2)
    paper = dict(preset="paper", arch="ours", amp="fp32", attn="sdpa", ckpt=False, compile=False, threads=None,
                 batch=args.paper_batch, warmup=1, iters=1 if quick else 2, rounds=1 if quick else 3)
    out = [
        ("step_demo_fp32", demo),
        ("step_demo_bf16", dict(demo, amp="bf16")),
        ("step_demo_math", dict(demo, attn="math")),
        ("step_demo_ckpt", dict(demo, ckpt=True)),
        ("step_demo_threads", dict(demo, threads=None)),
    ]
    if quick:  # the full paper-size step takes ~1 min here even at batch 1: check the audio tower only
        return out + [("step_paper_audio", dict(paper, tower="audio")),
                      ("step_paper_audio_ab", dict(paper, tower="audio", ab=True, iters=3))]
    return out + [
        ("step_demo_pad512", dict(demo, text="padded512", warmup=1, iters=3)),  # ~5 s a step
        ("step_demo_reference", dict(demo, arch="reference")),
        ("step_demo_compile", dict(demo, compile=True, rounds=1)),
        ("step_paper_fp32", dict(paper, compare_adam=True)),
        ("step_paper_bf16", dict(paper, amp="bf16")),
        ("step_paper_math", dict(paper, attn="math")),
        ("step_paper_ckpt", dict(paper, ckpt=True, rounds=1)),  # for its memory; speed +-noise
        ("step_paper_bf16_ckpt", dict(paper, amp="bf16", ckpt=True, rounds=1)),  # the paper command's setting
        ("step_paper_reference", dict(paper, arch="reference")),
        # the audio tower alone, where the two encoders differ (BERT and Adam dominate the full step)
        ("step_paper_audio", dict(paper, tower="audio", iters=3)),
        ("step_paper_audio_reference", dict(paper, tower="audio", arch="reference", iters=3)),
        # the comparisons that decide the target: both designs in one process, steps alternating
        ("step_paper_ab", dict(paper, ab=True, iters=4, rounds=1)),
        ("step_paper_audio_ab", dict(paper, tower="audio", ab=True, iters=8, rounds=1)),
        # what the released positional LayerNorm costs ours: without it vs with it, alternating
        ("step_paper_posln_ab", dict(paper, ab=True, arms=("ours_no_posln", "ours"), iters=6, rounds=1)),
    ]


def describe(spec):
    parts = [spec["arch"] if spec["arch"] == "reference" else "ours", spec["amp"],
             "SDPA" if spec["attn"] == "sdpa" else "plain math (sdpa_kernel MATH)"]
    if spec["ckpt"]:
        parts.append("grad ckpt")
    if spec["compile"]:
        parts.append("torch.compile(audio_encoder)")
    if spec.get("text") == "padded512":
        parts.append("text padded to 512")
    parts.append(threads(spec["threads"] or torch.get_num_threads()))
    if spec.get("tower") == "audio":
        parts.append("audio tower only")
    if spec.get("ab"):
        parts[0] = " vs ".join(spec.get("arms", AB_ARMS)) + ", alternating"
    if spec["preset"] == "paper":
        parts.append(f"batch {spec['batch']}")
    return ", ".join(parts)


def run_step_worker(spec):
    """One variant in a fresh process -> its result dict, or {"error": why}."""
    timeout = 900 if spec["compile"] else 600
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_step", json.dumps(spec)],
                              capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout} s"}
    r = _result_line(proc.stdout)
    if r is None:  # the exception's own line, not the "set TORCH_LOGS" advice printed after it
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        r = {"error": next((line for line in reversed(lines) if "Error" in line), lines[-1]).strip()}
    return r


def bench_step(ctx):
    args = ctx.args
    variants = [(key, spec) for key, spec in step_variants(args) if not args.variants or key in args.variants]
    # the demo batches come from a cache of sample_data: built only when a demo variant runs
    batches = demo_batches(ctx, ctx.tmp) if any(spec["preset"] == "demo" for _, spec in variants) else None
    variants = [(key, dict(spec, device=args.device, batches=batches)) for key, spec in variants]
    results = {key: [] for key, _ in variants}
    for r in range(max(spec["rounds"] for _, spec in variants)):
        for key, spec in variants:
            if r < spec["rounds"]:
                t = time.time()
                results[key].append(run_step_worker(dict(spec, compare_adam=spec.get("compare_adam") and r == 0)))
                got = results[key][-1]
                print(f"  {key}: {got.get('samples_per_s') or got.get('error')} ({time.time() - t:.0f} s)",
                      file=sys.stderr, flush=True)
    rows = []
    for key, spec in variants:
        ok = [r for r in results[key] if "error" not in r]
        best = dict(max(ok, key=lambda r: r["samples_per_s"]) if ok else results[key][-1])
        adam = [r["adam_s"] for r in ok if r.get("adam_s")]
        if adam and "adam_s" not in best:  # measured in the first round only
            best["adam_s"] = adam[0]
            best["notes"] += "; Adam alone: " + ", ".join(f"{k} {v:.2f} s" for k, v in adam[0].items())
        notes = best.get("notes", "")
        if "error" in best:
            notes = f"FAILED: {best['error']}"
        elif len(ok) > 1:
            notes += f"; fastest of {len(ok)} processes ({', '.join(fmt_rate(r['samples_per_s']) for r in ok)})"
        rows.append(row(f"step/{spec['preset']}", describe(spec), best.get("samples_per_s"), "samples/s",
                        best.get("peak_mb"), notes, key=key,
                        **{k: v for k, v in best.items() if k not in ("notes", "peak_mb")}))
    return rows


def bench_memory(ctx):
    """Peak memory of a paper-size training step at the paper's per-GPU batch of 100 (800 / 8).

    On a GPU the batch of 100 itself is run (an out-of-memory is the answer, not a failure). On CPU
    it cannot be: the peak grows linearly with the batch (activations, and the batch itself) on top
    of what does not (weights, gradients, Adam's two moments), so it is measured at two small
    batches and extrapolated. CPU autocast keeps the same tensors for backward as CUDA autocast, so
    this estimates the GPU's need to within the allocators' slack.
    """
    args, rows = ctx.args, []
    sizes = (1, 100) if args.device == "cuda" else (1, 3)
    for amp in ("fp32", "bf16"):
        for ckpt in (False, True):
            spec = dict(preset="paper", arch="ours", amp=amp, attn="sdpa", ckpt=ckpt, compile=False, threads=None,
                        warmup=1, iters=1, device=args.device)
            got = {B: run_step_worker(dict(spec, batch=B)) for B in sizes}
            key, what = f"memory_{amp}_{'ckpt' if ckpt else 'nockpt'}", describe(dict(spec, batch=sizes[-1]))
            bad = {B: r["error"] for B, r in got.items() if "error" in r}
            if bad:
                if args.device == "cuda" and 100 in bad and "out of memory" in bad[100].lower():
                    rows.append(row("memory/paper", what, None, "GB at B 100", notes="batch 100 does NOT fit: "
                                    f"{bad[100][:120]}", key=key, fits=False))
                else:
                    rows.append(row("memory/paper", what, None, "GB at B 100", notes=f"FAILED: {bad}", key=key))
                continue
            (b0, r0), (b1, r1) = sorted(got.items())
            per_sample = (r1["peak_mb"] - r0["peak_mb"]) / (b1 - b0)
            total_mb = r0["weights_mb"] + r0["peak_mb"] + (100 - b0) * per_sample
            how = ("measured at batch 100" if b1 == 100 else
                   f"extrapolated from batch {b0} (+{r0['peak_mb']:,.0f} MB) and {b1} (+{r1['peak_mb']:,.0f} MB)")
            rows.append(row("memory/paper", what, total_mb / 1024, "GB at B 100", None,
                            f"{how}: weights {r0['weights_mb']:,.0f} MB + step peak; {per_sample:,.0f} MB per "
                            f"sample; 120 s songs, 512-token texts", key=key, total_gb=total_mb / 1024,
                            per_sample_mb=per_sample, fits=total_mb / 1024 <= 80))
    return rows


def build_model(spec):
    """The HTCL of a step variant, in train mode with stage 1's parameters trainable."""
    if spec["preset"] == "demo":
        cfg = demo_config().model
    else:
        cfg = htcl.HTCLConfig(text_pretrained=False, text_model_config=dict(BERT_BASE_MULTILINGUAL))
    cfg.audio.gradient_checkpointing = cfg.text_gradient_checkpointing = spec["ckpt"]
    torch.manual_seed(0)
    model = htcl.HTCL(cfg)
    if spec["arch"] == "reference":
        model.audio_encoder = ReferenceAudioEncoder(cfg.audio)
    elif spec["arch"] == "ours_no_posln":  # ours without the released positional LayerNorm: its cost
        model.audio_encoder.pos_conv.norm = nn.Identity()
    model.freeze_unused(stage=1)
    return model.train()


def step_batches(spec, device):
    """The batches a step variant trains on: [batch] (+ another length for the compile row)."""
    if spec["preset"] == "demo":
        saved = torch.load(spec["batches"])
        batches = [saved["padded512" if spec.get("text") == "padded512" else "batch"]]
        if spec["compile"]:
            batches.append(saved["other"])
    else:  # paper: full 120 s songs and texts long enough to fill BERT's 512 tokens
        B, g = spec["batch"], torch.Generator().manual_seed(0)
        batches = [{"mel": torch.randn(B, data.MAX_FRAMES, data.N_MELS, generator=g),
                    "padding_mask": torch.zeros(B, data.MAX_FRAMES, dtype=torch.bool),
                    "tokens": {"input_ids": torch.randint(0, BERT_BASE_MULTILINGUAL["vocab_size"], (B, 512),
                                                          generator=g),
                               "attention_mask": torch.ones(B, 512, dtype=torch.long),
                               "token_type_ids": torch.zeros(B, 512, dtype=torch.long)}}]
    move = lambda x: {k: move(v) for k, v in x.items()} if isinstance(x, dict) else x.to(device)  # noqa: E731
    return [move(b) for b in batches]


def make_step(spec, device):
    """A step variant's model, batches and training step -> (model, batches, step, loss_of, params).
    step(batch) -> seconds of (forward, backward, clip + Adam)."""
    import pretrain
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = build_model(spec).to(device)
    batches = step_batches(spec, device)
    audio_only = spec.get("tower") == "audio"
    if spec["compile"]:
        # a cold compile, as a user's first run sees it: Inductor's on-disk caches (left by an earlier
        # run of this bench) would otherwise cut 60 s to 3
        torch.compiler.config.force_disable_caches = True
        model.audio_encoder = torch.compile(model.audio_encoder)
    # ours: the loop's optimizer, Adam with two learning rates, fused on CPU and CUDA
    # (pretrain.build_optimizer); the reference: torch.optim.Adam as the released code builds it, with
    # torch's default implementation (a per-tensor loop on CPU, foreach on CUDA)
    optimizer = pretrain.build_optimizer(model, pretrain.PretrainConfig(), device.type)
    if spec["arch"] == "reference":
        optimizer = torch.optim.Adam([{k: v for k, v in g.items() if k in ("params", "lr")}
                                      for g in optimizer.param_groups])
    params = [p for p in model.parameters() if p.requires_grad]
    attention = (lambda: sdpa_kernel(SDPBackend.MATH)) if spec["attn"] == "math" else contextlib.nullcontext

    def loss_of(batch):
        if audio_only:  # the audio tower alone, under a stand-in loss; Adam skips the gradient-less rest
            return model.audio_encoder(batch["mel"], batch["padding_mask"]).float().square().mean()
        return model(batch, stage=1)[0]

    def step(batch):
        """pretrain.train's inner step without Accelerate: autocast forward, backward, clip, Adam."""
        t0 = time.perf_counter()
        with attention(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["amp"] == "bf16"):
            loss = loss_of(batch)
        sync(device)
        t1 = time.perf_counter()
        with attention():
            loss.backward()
        sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scales()
        sync(device)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    return model, batches, step, loss_of, params


def step_worker(spec):
    """One training-step variant in this (fresh) process -> BENCH_RESULT line on stdout."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if spec.get("ab"):
        return ab_worker(spec, device)
    model, batches, step, loss_of, params = make_step(spec, device)
    weights_mb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    audio_only = spec.get("tower") == "audio"
    batch = batches[0]
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    mem = PeakRSS().__enter__() if device.type == "cpu" else None
    phases, first_s = [], None
    for i in range(spec["warmup"] + spec["iters"]):
        t = time.perf_counter()
        f, b, o = step(batch)
        if i == 0:
            first_s = time.perf_counter() - t  # with torch.compile: compile + one step
        if i >= spec["warmup"]:
            phases.append((f, b, o))
    recompile_s = recompile_error = None
    if spec["compile"]:  # every training batch has its own length: does a new one recompile, and work?
        t = time.perf_counter()
        try:
            step(batches[1])
            recompile_s = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 -- a compiler failure is the result to report
            recompile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
    if mem is not None:
        mem.__exit__(None, None, None)
        peak_mb = mem.mb
    else:
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20

    fwd, bwd, opt = (statistics.median(p[j] for p in phases) for j in range(3))
    step_s = statistics.median(sum(p) for p in phases)
    B, T = batch["mel"].shape[:2]
    L = batch["tokens"]["input_ids"].shape[1]
    frames = data.MAX_FRAMES if spec["arch"] == "reference" else T  # the reference pads every song to 1251
    flops = flops_per_sample(model.cfg, L, frames, None if audio_only else model.text_encoder.model.config)
    samples_per_s = B / step_s
    peak = gpu_peak_flops(device)
    notes = (f"B {B}, T {T} frames" + ("" if audio_only else f", text {L} tokens") +
             f"; fwd {fwd:.3f} / bwd {bwd:.3f} / clip+Adam {opt:.3f} s; median of {len(phases)} "
             f"after {spec['warmup']} warm-up; {threads(torch.get_num_threads())}")
    if audio_only:
        notes += "; audio tower only, stand-in loss"
    if spec["arch"] == "reference":
        notes += "; audio padded to 1251 frames, no mask; torch.optim.Adam defaults"
    compile_s = None
    if spec["compile"]:
        compile_s = max(0.0, first_s - step_s)
        notes += f"; compile {compile_s:.1f} s; a batch of a new length: " + (
            f"{recompile_s:.1f} s" if recompile_error is None else f"FAILED after {time.perf_counter() - t:.0f} s "
            f"({recompile_error})")
    result = {"samples_per_s": samples_per_s, "step_s": step_s, "fwd_s": fwd, "bwd_s": bwd, "opt_s": opt,
              "first_step_s": first_s, "peak_mb": peak_mb, "flops_per_sample": flops,
              "achieved_flops": flops * samples_per_s, "mfu": flops * samples_per_s / peak if peak else None,
              "compile_s": compile_s, "recompile_s": recompile_s, "recompile_error": recompile_error,
              "batch": B, "frames": T, "text_tokens": L, "weights_mb": weights_mb}
    if spec.get("compare_adam"):
        result["adam_s"] = compare_adam(model, params, loss_of(batch))
        notes += "; Adam alone: " + ", ".join(f"{k} {v:.2f} s" for k, v in result["adam_s"].items())
    result["notes"] = notes
    print("BENCH_RESULT " + json.dumps(result), flush=True)


AB_ARMS = ("ours", "reference")  # the pair an A/B row compares unless its spec names "arms"


def ab_worker(spec, device):
    """Two designs (spec["arms"], default ours and the reference) in one (fresh) process, their
    steps alternating -> BENCH_RESULT line; ratio = time of the second / time of the first.

    Separate processes on a shared machine differ by more than the two designs do (seen here:
    ours / reference 0.87x in one full run, 1.14x in the next); alternating puts both under the
    same load. The order flips every round so neither always runs right after the other."""
    first, second = spec.get("arms", AB_ARMS)
    arms = {arch: make_step(dict(spec, arch=arch), device) for arch in (first, second)}
    phases = {arch: [] for arch in arms}
    for i in range(spec["warmup"] + spec["iters"]):
        for arch in ((first, second) if i % 2 == 0 else (second, first)):
            _, batches, step, _, _ = arms[arch]
            f, b, o = step(batches[0])
            if i >= spec["warmup"]:
                phases[arch].append((f, b, o))
    B = arms[first][1][0]["mel"].shape[0]
    got = {}
    for arch, ph in phases.items():
        got[arch] = {"step": (min(sum(p) for p in ph), statistics.median(sum(p) for p in ph)),
                     "fwd_bwd": (min(p[0] + p[1] for p in ph), statistics.median(p[0] + p[1] for p in ph))}
    ratio = {what: [got[second][what][j] / got[first][what][j] for j in (0, 1)] for what in ("step", "fwd_bwd")}
    notes = (f"B {B}; {len(phases[first])} steps each, alternating, after {spec['warmup']} warm-up; step s "
             f"(min/median) {first} {got[first]['step'][0]:.3f}/{got[first]['step'][1]:.3f}, {second} "
             f"{got[second]['step'][0]:.3f}/{got[second]['step'][1]:.3f}; time {second}/{first} "
             f"{ratio['step'][0]:.3f}x/{ratio['step'][1]:.3f}x, forward+backward alone "
             f"{ratio['fwd_bwd'][0]:.3f}x/{ratio['fwd_bwd'][1]:.3f}x; {threads(torch.get_num_threads())}; "
             f"load average {load_average()}")
    print("BENCH_RESULT " + json.dumps({"samples_per_s": B / got[first]["step"][0],
                                        "ref_samples_per_s": B / got[second]["step"][0],
                                        "ratio_step": ratio["step"], "ratio_fwd_bwd": ratio["fwd_bwd"],
                                        "peak_mb": None, "notes": notes}), flush=True)


def compare_adam(model, params, loss):
    """Seconds of one Adam step over these gradients for each of torch's implementations.
    This comparison is why pretrain.build_optimizer asks for fused on CPU as well as CUDA."""
    loss.backward()
    out = {}
    for name, kw in (("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))):
        optimizer = torch.optim.Adam(params, lr=1e-3, **kw)
        try:
            out[name] = median_time(optimizer.step, 1, 1)  # the warm-up step allocates the moments
        except RuntimeError as e:  # e.g. no fused kernel for this device
            out[name] = float("nan")
            print(f"Adam {name}: {e}", file=sys.stderr)
        del optimizer
    return out


# --- embedding extraction ---------------------------------------------------------------------


def bench_embed(ctx):
    from evals.embeddings import embed_catalog
    args, rows = ctx.args, []
    device = torch.device(args.device)
    tok = tokenizer()
    torch.manual_seed(0)
    models = {
        "demo": htcl.HTCL(demo_config().model),
        # the paper's audio encoder; the text tower is never run when only audio is embedded
        "paper": htcl.HTCL(htcl.HTCLConfig(text_model=TINY_BERT, text_pretrained=False, text_pooling="mean")),
    }
    for size, model in models.items():
        catalog, cache, _ = ctx.demo if size == "demo" else ctx.paper
        model = model.to(device).eval()
        songs = list(range(len(catalog)))
        n_threads = 1 if size == "demo" else None  # sample_data/demo.sh runs evaluate.py on one thread
        for mode in ("full", "chunked"):
            run = lambda rows_: embed_catalog(model, tok, catalog, rows_, mode=mode, cache=cache)  # noqa: E731
            with torch_threads(n_threads), PeakRSS() as mem:
                run(songs[:2])  # warm-up
                seconds = median_time(lambda: run(songs), 0, 1 if args.quick else 2)
            frames = "sample_data songs (~4 s)" if size == "demo" else "120 s songs (1251 frames)"
            rows.append(row(f"embed/{size}", f"evals.embeddings.embed_catalog mode={mode}, batch 16",
                            len(songs) / seconds,
                            "songs/s", mem.mb, f"{len(songs)} {frames} from the cache; "
                            f"{'10 s windows, mean-pooled' if mode == 'chunked' else 'one pass per song'}; "
                            f"{threads(n_threads or torch.get_num_threads())}", key=f"embed_{size}_{mode}"))
    return rows


# --- matching ---------------------------------------------------------------------------------


def _count(s):
    s = s.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if scale > 1 else s) * scale)


def bench_matching(ctx):
    import evaluate
    rows, runs = [], []
    sizes = [tuple(_count(v) for v in pair.split(":")) for pair in ctx.args.matching.split(",")]
    for songs, users in sizes:
        with PeakRSS() as mem:
            r = evaluate.matching_benchmark(songs, users)
        runs.append((songs, users, r["seconds"]))
        rows.append(row("matching", f"{songs:,} songs x {users:,} users, D 100", users / r["seconds"], "users/s",
                        mem.mb, f"{r['seconds']:.1f} s for HR@100 (30 triggers/user); one run; "
                        f"{threads(r['threads'])}", key=f"matching_{songs}_{users}", seconds=r["seconds"]))
    # Estimate the sizes not run. Phase 1 of matching_hits scores every distinct trigger song against
    # every song (cost ~ distinct x songs); phase 2 merges each user's candidates (cost ~ users).
    # Least squares on the runs made gives the two per-unit costs.
    def terms(songs, users):
        distinct = songs * (1 - (1 - 1 / songs) ** (30 * users))  # expected distinct songs among 30/user
        return [distinct * songs, users]
    A = np.array([terms(a, b) for a, b, _ in runs], dtype=float)
    seconds = np.array([t for _, _, t in runs])
    if len(runs) >= 2:
        coef = np.clip(np.linalg.lstsq(A / A.max(0), seconds, rcond=None)[0], 0, None) / A.max(0)
    else:
        coef = np.array([seconds[0] / A[0, 0], 0.0])
    done = {(a, b) for a, b, _ in runs}
    for songs, users in ((100_000, 10_000), (1_000_000, 1_000), (1_000_000, 10_000)):
        if (songs, users) not in done:
            est = float(np.dot(coef, terms(songs, users)))
            rows.append(row("matching (estimated)", f"{songs:,} songs x {users:,} users, D 100", users / est,
                            "users/s", None, f"NOT RUN: ~{est:.0f} s, fitted to the runs above "
                            f"(time ~ a * distinct triggers x songs + b * users); run it with --matching",
                            key=f"matching_{songs}_{users}_estimate", seconds=est))
    return rows


# --- search -----------------------------------------------------------------------------------


def clustered_songs(n, dim=100, clusters=1000, noise=1.0, seed=0):
    """n unit vectors around `clusters` random centres ("genres"), noise as large as the centres'
    spread: harder for an approximate index than real embeddings tend to be, easier than pure noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_search(ctx):
    import importlib.util
    from evals import search as evsearch
    rows, k = [], 10
    sizes = [100_000] + ([] if ctx.args.quick else [1_000_000])  # quick: the 1M index takes ~1 min to build
    for n in sizes:
        keys = clustered_songs(n)
        n_queries = 1000 if n <= 100_000 else 300
        # song-id queries: each leaves itself out, so finding itself earns an index nothing
        own = np.random.default_rng(1).choice(n, n_queries, replace=False)
        queries = keys[own]

        def timed(index):
            t = time.perf_counter()
            _, found = evsearch.search(queries, keys, k, own, index)
            batch = (time.perf_counter() - t) / n_queries
            t = time.perf_counter()
            for q, r in zip(queries[:50], own[:50]):
                evsearch.search(q[None], keys, k, r[None], index)
            return found, batch, (time.perf_counter() - t) / 50

        exact_r, seconds, single = timed(None)
        rows.append(row("search", f"{n:,} songs, D 100, exact top-{k} in torch", 1 / seconds, "queries/s",
                        None, f"{1000 * seconds:.2f} ms/query in a batch of {n_queries}, {1000 * single:.1f} ms "
                        f"alone; recall 1 by definition; {threads(torch.get_num_threads())}",
                        key=f"search_{n}_exact"))
        if importlib.util.find_spec("faiss") is None:
            rows.append(row("search", f"{n:,} songs, FAISS", None, "queries/s", None,
                            "NOT RUN: faiss-cpu not installed (pip install faiss-cpu)", key=f"search_{n}_faiss"))
            continue
        import faiss
        # the index embed --index faiss builds at this size; at 100k also the approximate one, for scale
        for approx_from in sorted({evsearch.FAISS_APPROX_FROM, 0} if n < evsearch.FAISS_APPROX_FROM else {0},
                                  reverse=True):
            t = time.perf_counter()
            index = evsearch.build_index(keys, approx_from=approx_from)
            build = time.perf_counter() - t
            kind = "IndexFlatIP (exact)" if n < approx_from else \
                f"IVF{faiss.extract_index_ivf(index).nlist},Flat nprobe {evsearch.FAISS_NPROBE}"
            got, seconds, single = timed(index)
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact_r)]))
            rows.append(row("search", f"{n:,} songs, D 100, FAISS {kind}", 1 / seconds, "queries/s", None,
                            f"recall@{k} {recall:.3f} vs exact; build {build:.1f} s; "
                            f"{1000 * seconds:.2f} ms/query in a batch, {1000 * single:.1f} ms alone; "
                            f"{threads(faiss.omp_get_max_threads())}", recall=recall, build_s=build,
                            key=f"search_{n}_{'ivf' if approx_from == 0 else 'flat'}"))
            del index
    return rows


# --- artist graph -----------------------------------------------------------------------------

OLGA = {"nodes": 17_673, "pairs": 101_029, "train": 14_139, "val": 1_767, "test": 1_767}  # paper-notes.md sec. 3


def olga_like_graph(seed=0, scale=1.0, communities=500, within=0.85, alpha=1.5):
    """A synthetic artist graph of OLGA's size -> (edges (E, 2) lower id -> higher id, as OLGA stores
    them, split (N,)). Power-law degrees (Chung-Lu weights, Pareto tail alpha) and communities: an
    edge stays inside its first end's community with probability `within`, so neighbours of
    neighbours tend to be neighbours and graph layers have something to find. `scale` shrinks
    every count (for the early-stopping check)."""
    rng = np.random.default_rng(seed)
    n, n_pairs = int(OLGA["nodes"] * scale), int(OLGA["pairs"] * scale)
    weight = rng.pareto(alpha, n) + 1.0
    community = rng.integers(0, communities, n)
    order = np.argsort(community, kind="stable")  # nodes grouped by community, for within-draws
    cum = np.cumsum(weight[order])
    start = np.searchsorted(community[order], np.arange(communities))
    lo = np.concatenate([[0.0], cum])[start]
    hi = cum[np.concatenate([start[1:], [n]]) - 1]
    pairs = np.empty((0, 2), dtype=np.int64)
    while len(pairs) < n_pairs:
        m = 2 * (n_pairs - len(pairs))
        u = order[np.minimum(np.searchsorted(cum, rng.random(m) * cum[-1]), n - 1)]
        c = community[u]
        r = np.where(rng.random(m) < within, lo[c] + rng.random(m) * (hi[c] - lo[c]), rng.random(m) * cum[-1])
        v = order[np.minimum(np.searchsorted(cum, r), n - 1)]
        new = np.stack([np.minimum(u, v), np.maximum(u, v)], 1)[u != v]
        pairs = np.unique(np.concatenate([pairs, new]), axis=0)
    pairs = pairs[rng.permutation(len(pairs))[:n_pairs]]
    split = np.empty(n, dtype=object)
    perm = rng.permutation(n)
    n_train, n_val = int(OLGA["train"] * scale), int(OLGA["val"] * scale)
    split[perm[:n_train]], split[perm[n_train:n_train + n_val]], split[perm[n_train + n_val:]] = "train", "val", "test"
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))], split


def bench_artist_graph(ctx):
    """Seconds per epoch (16 full-graph steps + the validation loss) at 1 and 4 layers on the
    OLGA-size graph with the released random features (2613-d), and the whole 0-4 sweep at 200
    epochs, extrapolated: epoch time is linear in the layer count (fitted to 1 and 4)."""
    from evals import artist_graph
    small_edges, small_split = olga_like_graph(scale=0.02, communities=10)  # warm-up: the first optimizer
    artist_graph.train_artist_gnn(artist_graph.artist_features("random", small_split, dim=8),  # pulls in ~20 s
                                  artist_graph.message_passing_graphs(small_edges, small_split), small_split, 1,  # of
                                  artist_graph.ArtistGraphConfig(epochs=1, steps_per_epoch=1))  # imports
    edges, split = olga_like_graph()
    x = artist_graph.artist_features("random", split)
    graphs = artist_graph.message_passing_graphs(edges, split)
    epochs = 1 if ctx.args.quick else 2
    cfg = artist_graph.ArtistGraphConfig(epochs=epochs)
    per_epoch, rows = {}, []
    for n_layers in (1, 4):
        t = time.time()
        artist_graph.train_artist_gnn(x, graphs, split, n_layers, cfg)
        per_epoch[n_layers] = (time.time() - t) / epochs
        rows.append(row("artist-graph/epoch", f"{n_layers} layer(s), {len(split):,} artists, {len(edges):,} pairs",
                        per_epoch[n_layers], "s/epoch", None, f"{epochs} epoch(s), setup included; 1 torch thread "
                        f"(evals.metrics.one_thread); load average {load_average()}",
                        key=f"artist_epoch_{n_layers}"))
    slope = (per_epoch[4] - per_epoch[1]) / 3
    sweep = sum(per_epoch[1] + slope * (n_layers - 1) for n_layers in range(5)) * 200
    rows.append(row("artist-graph/sweep", "0-4 layers x 200 epochs (released), estimated", sweep / 60, "min",
                    None, "NOT RUN: from the two rows above, epoch time linear in the layer count",
                    key="artist_sweep_200"))
    return rows


def artist_curve(n_layers, scale=0.1, dim=256, epochs=200, seed=0):
    """One released-protocol run on a scaled-down OLGA-like graph, scored on the test set after every
    epoch -> {"val_loss": [...], "ndcg": [...], "ndcg_released": [...], "seconds": ...}. Stopping
    early only truncates a run (same seed, same draws), so one run gives every stopping rule's
    result next to the last epoch's."""
    from evals import artist_graph
    edges, split = olga_like_graph(seed, scale, communities=max(1, int(500 * scale)))
    x = artist_graph.artist_features("random", split, dim=dim)
    graphs = artist_graph.message_passing_graphs(edges, split)
    test = np.flatnonzero(split == "test")
    local = torch.full((len(split),), -1, dtype=torch.long)
    local[test] = torch.arange(len(test))
    curve = {"ndcg": [], "ndcg_released": []}

    def score(epoch, model):
        r = artist_graph.artist_ndcg(artist_graph.embed_artists(model, x, graphs["test"], test, n_layers),
                                     local[graphs["truth_test"]])
        curve["ndcg"].append(r["ndcg"])
        curve["ndcg_released"].append(r["ndcg_released"])

    t = time.time()
    _, history = artist_graph.train_artist_gnn(x, graphs, split, n_layers,
                                               artist_graph.ArtistGraphConfig(epochs=epochs), seed, on_epoch=score)
    return {**curve, "val_loss": history["val_loss"], "lr": history["lr"], "seconds": time.time() - t,
            "n_layers": n_layers, "scale": scale, "dim": dim}


def stop_epoch(val_loss, patience):
    """The epoch (1-based) at which --early_stop PATIENCE ends a run with this val-loss curve."""
    best, since = float("inf"), 0
    for epoch, v in enumerate(val_loss, 1):
        since = 0 if v < best else since + 1
        best = min(best, v)
        if since >= patience:
            return epoch
    return len(val_loss)


# -----------------------------------------------------------------------------
# Ratios against the targets, and the report.


def ratios(rows):
    """(what, value, target, verdict) for every derived comparison whose rows were measured."""
    by = {r["key"]: r for r in rows if r.get("rate")}
    out = []

    def ratio(what, num, den, target=None):
        if num in by and den in by:
            v = by[num]["rate"] / by[den]["rate"]
            verdict = "" if target is None else ("meets" if v >= target else "MISSES")
            out.append({"what": what, "value": v, "text": f"{v:.2f}x",
                        "target": None if target is None else f">= {target}x", "verdict": verdict})

    for r in (r for r in rows if r.get("vs_gpu") is not None):  # shards.loader_report: against one H200's 641/s
        out.append({"what": f"shards loader / one H200: {r['config']}", "value": r["vs_gpu"], "target": ">= 1.5x",
                    "text": f"{r['vs_gpu']:.2f}x; {r['per_core']:.0f}/CPU-s: {math.ceil(1.5 * 641 / r['per_core'])} "
                    "cores a GPU", "verdict": "meets" if r["vs_gpu"] >= 1.5 else "MISSES"})
    for fmt in ("wav", "flac"):
        ratio(f"data: ours / librosa songs/s ({fmt})", f"data_ours_{fmt}", f"data_librosa_{fmt}", 2)
        ratio(f"data: ceiling of that ratio, decode alone / librosa ({fmt})", f"data_decode_{fmt}",
              f"data_librosa_{fmt}")
    ratio("loader / training step samples/s (demo preset, 1 thread as demo.sh)", "loader_demo", "step_demo_fp32", 10)
    ratio("loader / training step samples/s (demo preset, default threads)", "loader_demo", "step_demo_threads", 10)
    for key, what in (("step_paper_ab", "paper step"), ("step_paper_audio_ab", "paper audio tower alone")):
        if key in by:  # the target's measurement: both in one process, alternating
            for name, field, target in (("", "ratio_step", 1), (", forward + backward only", "ratio_fwd_bwd", None)):
                lo, med = by[key][field]
                verdict = "" if target is None else ("meets" if lo >= target and med >= target else "MISSES")
                out.append({"what": f"{what}{name}: ours / reference, alternating in one process (min, median)",
                            "value": med, "text": f"{lo:.2f}x, {med:.2f}x",
                            "target": None if target is None else f">= {target}x", "verdict": verdict})
    if "step_paper_posln_ab" in by:  # issue target: the released positional LayerNorm costs <= 2%
        lo, med = by["step_paper_posln_ab"]["ratio_step"]
        out.append({"what": "paper step: with / without the positional LayerNorm, time, alternating (min, median)",
                    "value": med, "text": f"{lo:.3f}x, {med:.3f}x", "target": "<= 1.02x",
                    "verdict": "meets" if lo <= 1.02 and med <= 1.02 else "MISSES"})
    ratio("paper step: ours / reference, separate processes (nn.TransformerEncoder, padded, fp32)",
          "step_paper_fp32", "step_paper_reference")
    ratio("paper audio tower alone: ours / reference, separate processes", "step_paper_audio",
          "step_paper_audio_reference")
    ratio("demo step: ours (masked, batch-length padding) / reference (padded to 1251)", "step_demo_fp32",
          "step_demo_reference")
    ratio(f"demo step: default threads ({torch.get_num_threads()}) / 1 thread", "step_demo_threads", "step_demo_fp32")
    for size in ("demo", "paper"):
        ratio(f"{size} step: bf16 autocast / fp32", f"step_{size}_bf16", f"step_{size}_fp32")
        ratio(f"{size} step: SDPA / plain math", f"step_{size}_fp32", f"step_{size}_math")
        ratio(f"{size} step: grad ckpt / none (speed)", f"step_{size}_ckpt", f"step_{size}_fp32")
        a, b = by.get(f"step_{size}_ckpt"), by.get(f"step_{size}_fp32")
        if a and b and a.get("peak_mb") and b.get("peak_mb"):
            saving = 1 - a["peak_mb"] / b["peak_mb"]
            out.append({"what": f"{size} step: grad ckpt peak-memory saving", "value": saving,
                        "text": f"{saving:.0%} ({b['peak_mb']:.0f} -> {a['peak_mb']:.0f} MB)", "target": None,
                        "verdict": ""})
    adam = by.get("step_paper_fp32", {}).get("adam_s")
    if adam and adam.get("fused"):
        for name in ("foreach", "fused"):
            v = adam["for-loop"] / adam[name]
            out.append({"what": f"paper Adam step alone: {name} / for-loop",
                        "value": v, "text": f"{v:.2f}x ({adam['for-loop']:.2f} -> {adam[name]:.2f} s)",
                        "target": None, "verdict": ""})
    ratio("demo step: text dynamic padding / padded to 512", "step_demo_fp32", "step_demo_pad512")
    ratio("demo step: torch.compile(audio_encoder) / eager", "step_demo_compile", "step_demo_fp32")
    ratio("demo loader: memmap cache / decode on the fly", "loader_demo", "loader_demo_decode")
    ratio("paper loader (cache) / data.song_mel decode (wav)", "loader_paper", "data_ours_wav")
    ratio("demo loader: 2 workers / 0 (cache)", "loader_demo_workers", "loader_demo")
    ratio("demo loader: 2 workers / 0 (decode on the fly)", "loader_demo_decode_workers", "loader_demo_decode")
    ratio("paper loader: 2 workers / 0 (cache)", "loader_paper_workers", "loader_paper")
    ratio("paper loader, workers 0: 1 torch thread / default", "loader_paper_1thread", "loader_paper")
    ratio("demo loader: with tokenization / without", "loader_demo", "loader_demo_notext")
    ratio("embed paper: chunked / full", "embed_paper_chunked", "embed_paper_full")
    for n in ("100000", "1000000"):
        ratio(f"search {int(n):,} songs: FAISS IVF / exact torch, queries/s in a batch", f"search_{n}_ivf",
              f"search_{n}_exact")
    for r in rows:  # the memory rows: does the paper's per-GPU batch fit an 80 GB GPU?
        if r["key"].startswith("memory_") and r.get("fits") is not None:
            text = f"{r['rate']:.1f} GB" if r.get("rate") else "out of memory"
            out.append({"what": f"paper step at batch 100 (800 / 8 GPUs), {r['config'].rsplit(', batch', 1)[0]}",
                        "value": r.get("rate"), "text": text, "target": "<= 80 GB",
                        "verdict": "meets" if r["fits"] else "MISSES"})
    return out


def fmt_rate(v):
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def print_report(header, rows, derived):
    print("\n" + " | ".join(f"{k}: {v}" for k, v in header.items()))
    widths = (22, 62, 10, 10, 8)
    print(f"\n{'row':<22} {'config':<62} {'rate':>10} {'unit':<10} {'peak MB':>8}  notes")
    print("-" * 140)
    for r in rows:
        mb = "-" if r["peak_mb"] is None else f"{r['peak_mb']:,.0f}"
        extra = ""
        if r.get("flops_per_sample"):
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            extra = (f" | {r['flops_per_sample'] / 1e9:,.1f} GFLOP/sample, "
                     f"{r['achieved_flops'] / 1e9:,.1f} GFLOP/s achieved, MFU {mfu}")
        print(f"{r['name']:<{widths[0]}} {r['config'][:widths[1]]:<{widths[1]}} {fmt_rate(r['rate']):>{widths[2]}} "
              f"{r['unit']:<{widths[3]}} {mb:>{widths[4]}}  {r['notes']}{extra}")
    if derived:
        print(f"\n{'derived ratio':<84} {'value':<28} {'target':<8} verdict")
        print("-" * 130)
        for d in derived:
            print(f"{d['what']:<84} {d['text']:<28} {d['target'] or '':<8} {d['verdict']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized: fewer songs, variants and iterations (< ~2 min)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ALL_ROWS)} (default: all; "
                   "--quick leaves out memory, ~5 min of paper-size steps on a CPU, and artist, minutes of OLGA-size epochs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the step and embed rows (default cpu)")
    p.add_argument("--out", default="bench.json", help="JSON file for the table and ratios (default bench.json)")
    p.add_argument("--librosa_python", default=None,
                   help="python with librosa for the comparison row (default: this one); e.g. a separate venv")
    p.add_argument("--matching", default=None,
                   help="songs:users sizes, e.g. 10k:1k,1M:1k (default: 10k:1k,100k:1k,1M:1k,10k:10k; "
                        "--quick 10k:1k,10k:10k)")
    p.add_argument("--paper_batch", type=int, default=None,
                   help="batch of the paper-size step rows (default 2, --quick 1; x16 with --device cuda)")
    p.add_argument("--variants", default=None,
                   help="comma-separated keys of the step row's variants to run, alone unless --rows says more "
                        "(default: all of the mode), "
                        "e.g. step_paper_ab,step_paper_posln_ab; unknown keys list the valid ones")
    p.add_argument("--_step", help=argparse.SUPPRESS)  # internal: run one step variant in this process
    args = p.parse_args(argv)
    if args._step:
        return step_worker(json.loads(args._step))

    if args.rows is None and args.variants:
        args.rows = "step"
    if args.rows is None:
        args.rows = ",".join(r for r in ALL_ROWS if not (args.quick and r in ("memory", "artist")))
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows_wanted) - set(ALL_ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ALL_ROWS)}")
    if args.variants is not None:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        valid = [key for key, _ in step_variants(args)]
        if set(args.variants) - set(valid):
            p.error(f"unknown --variants {sorted(set(args.variants) - set(valid))}; "
                    f"{'--quick' if args.quick else 'the full run'} has {','.join(valid)}")
        if "step" not in rows_wanted:
            p.error("--variants selects variants of the step row: add step to --rows (or leave --rows out)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    args.matching = args.matching or ("10k:1k,10k:10k" if args.quick else "10k:1k,100k:1k,1M:1k,10k:10k")
    # CPU: at 2, quick's paper step alone takes ~1 min. GPU: 32 fits fp32 without checkpointing in
    # 80 GB (the memory rows: ~1 GB weights + ~3 GB gradients and Adam + ~0.9 GB a sample) and is
    # large enough for the kernels to reach their throughput, which MFU needs
    args.paper_batch = args.paper_batch or (1 if args.quick else 2) * (16 if args.device == "cuda" else 1)
    args.songs = 2 if args.quick else 6               # synthetic 120 s songs (wav/flac alternating)
    args.demo_songs = 128 if args.quick else 640      # sample_data songs in the demo cache
    out = os.path.abspath(args.out)
    # as sample_data/demo.sh: the Rust tokenizer's own thread pool gains nothing on batches of short
    # texts, and DataLoader workers forked after it has run would warn and turn it off anyway
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    header = {"cpu": cpu_model(), "torch threads": torch.get_num_threads(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "load average at start": load_average(), "mode": "quick" if args.quick else "full"}
    print(" | ".join(f"{k}: {v}" for k, v in header.items()), flush=True)
    t0 = time.time()
    rows = []
    benches = {"data": bench_data, "loader": bench_loader, "shards": bench_shards, "step": bench_step,
               "memory": bench_memory,
               "embed": bench_embed, "matching": bench_matching, "search": bench_search,
               "artist": bench_artist_graph}
    with tempfile.TemporaryDirectory(prefix="htcl-bench-") as tmp:
        ctx = Context(args, tmp)
        for name in ALL_ROWS:
            if name in rows_wanted:
                t = time.time()
                print(f"[{name}] ...", file=sys.stderr, flush=True)
                rows += benches[name](ctx)
                print(f"[{name}] {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    header["load average at end"] = load_average()
    header["wall seconds"] = round(time.time() - t0)
    derived = ratios(rows)
    print_report(header, rows, derived)
    with open(out, "w") as f:
        json.dump({"header": header, "rows": rows, "ratios": derived}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
