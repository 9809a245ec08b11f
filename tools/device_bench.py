"""The paper step's speed switches, one row each, alternating in one process; and the profiler's top kernels.

What it measures (Sec. 3.1.3's stage-1 step: both towers, InfoNCE, clip, Adam), each configuration ("arm")
a model of its own, their steps alternating round by round in one process so that every arm sees the same
machine state; the ranges are over rounds:

  chain     cumulative, each row adds one change to the row above it:
              baseline      what the loop did before: masks always passed (all-False audio padding mask,
                            all-ones text mask), BERT's eager attention, the host reads the loss and the
                            grad norm every step, no TF32, eager
              bert_sdpa     + BERT's fused attention (transformers' SDPA) instead of its eager pieces
              no_mask       + no mask when nothing is padded: both towers' SDPA may take its flash kernel
              no_host_sync  + no host read a step (the loop's device-side sums and found_inf skip)
              tf32          + TF32 for what runs in fp32 (today's default configuration: pretrain.py)
  compile   tf32_again (today's) and compile (+ torch.compile of both towers, static shapes: pretrain.py
            --compile), alternating: its own group, run last, since a cold compile takes minutes
  text      short texts (title + artists, no lyrics), today's configuration: padded to 512, to the batch's
            longest (today's loader) and on to a multiple of the bucket (what --compile pads to)

MFU = analytic FLOPs (bench.flops_per_sample) x samples/s / the GPU's dense bf16 peak (bench.PEAK_BF16).
profile_arms: torch.profiler over a few steps of an arm -> the top kernels by self CUDA time (self CPU
time on a CPU), per step and as a share of the total.

Called by tools/device_run.py (every device measurement as one JSON); alone, e.g.:
    python tools/device_bench.py --tiny                      # CPU, tiny model, ~1 min
    python tools/device_bench.py --device cuda --batch 100   # paper size on one GPU
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as htcl  # noqa: E402


@dataclass(frozen=True)
class Arm:
    """One configuration of the paper step."""
    name: str
    what: str
    mask: bool = True                # pass masks even when nothing is padded
    bert_attention: str = "eager"    # transformers' attention: eager (unfused pieces) or sdpa (fused)
    host_sync: bool = True           # read the loss and the grad norm on the host every step
    tf32: bool = False
    compile: bool = False
    text: str = "full"               # full (every text fills max_text) | short_max | short_longest | short_bucket


def chain_arms():
    """The cumulative rows, baseline first; today's default configuration is "tf32". The last, compile,
    runs in a group of its own (compile_arms), after the eager ones are safely measured."""
    arms = [Arm("baseline", "masks always passed, BERT eager attention, host reads loss + grad norm a step, "
                            "no TF32, eager")]
    for name, what, change in (
            ("bert_sdpa", "+ BERT's fused SDPA attention (fused BERT pieces)", dict(bert_attention="sdpa")),
            ("no_mask", "+ no mask when nothing is padded (flash-eligible SDPA, both towers)", dict(mask=False)),
            ("no_host_sync", "+ no host sync a step (device-side sums, found_inf skip)", dict(host_sync=False)),
            ("tf32", "+ TF32 for fp32 matmuls/convs = today's default", dict(tf32=True)),
            ("compile", "+ torch.compile of both towers, static shapes (--compile)", dict(compile=True))):
        arms.append(replace(arms[-1], name=name, what=what, **change))
    return arms


def compile_arms():
    """Today's configuration and the same compiled, alternating: compile's row, against today's."""
    arms = chain_arms()
    return [replace(arms[-2], name="tf32_again", what="today's default again, alternating with compile"), arms[-1]]


def text_arms():
    today = replace(chain_arms()[4], mask=False)
    return [replace(today, name="short_text_pad_max", what="short texts padded to max_text_length", text="short_max"),
            replace(today, name="short_text_longest", what="short texts padded to the batch's longest (today)",
                    text="short_longest"),
            replace(today, name="short_text_bucket", what="short texts padded on to a multiple of the bucket "
                                                          "(--compile's text_bucket)", text="short_bucket")]


def sizes(tiny, batch):
    """The step's sizes: the paper's (1251 frames, 512 tokens, BERT-base-multilingual), or tiny ones."""
    if tiny:
        return dict(batch=batch or 4, frames=256, max_text=64, short=(8, 40), bucket=16, amp=False)
    return dict(batch=batch or 100, frames=1251, max_text=512, short=(16, 200), bucket=64, amp=True)


def base_model(tiny):
    """The stage-1 model every arm copies (weights alike), on the CPU, train mode."""
    torch.manual_seed(0)
    if tiny:
        audio = htcl.AudioConfig(conv_channels=64, hidden=64, layers=2, heads=2, ffn=128)
        cfg = htcl.HTCLConfig(audio=audio, text_model=os.path.join(ROOT, "sample_data", "tiny-bert"),
                              text_pretrained=False, proj_dims=(48, 32), fusion_dims=(64, 32, 32))
    else:
        import bench
        cfg = htcl.HTCLConfig(text_pretrained=False, text_model_config=dict(bench.BERT_BASE_MULTILINGUAL))
    model = htcl.HTCL(cfg)
    model.freeze_unused(stage=1)
    return model.train()


def make_batches(sz, vocab, seed=0):
    """{text kind: host batch}: random log-mels of sz["frames"] (no song padded), token ids; "full" texts
    fill max_text; the short ones have lengths uniform in sz["short"], padded three ways."""
    g = torch.Generator().manual_seed(seed)
    B, L = sz["batch"], sz["max_text"]
    mel = torch.randn(B, sz["frames"], 128, generator=g)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    lengths = torch.randint(sz["short"][0], sz["short"][1] + 1, (B,), generator=g)
    longest = int(lengths.max())
    pad_to = {"full": L, "short_max": L, "short_longest": longest,
              "short_bucket": min(-(-longest // sz["bucket"]) * sz["bucket"], L)}
    out = {}
    for kind, to in pad_to.items():
        mask = torch.ones(B, to, dtype=torch.long) if kind == "full" else (
            torch.arange(to)[None] < lengths[:, None]).long()
        out[kind] = {"mel": mel, "padding_mask": torch.zeros(B, sz["frames"], dtype=torch.bool),
                     "tokens": {"input_ids": ids[:, :to] * mask, "attention_mask": mask,
                                "token_type_ids": torch.zeros(B, to, dtype=torch.long)}}
    return out


def arm_batch(arm, batches, device):
    """The arm's batch on the device; masks that mark nothing are None unless the arm passes them."""
    b = batches[arm.text]
    tokens = {k: v.to(device) for k, v in b["tokens"].items()}
    if not arm.mask and bool(b["tokens"]["attention_mask"].all()):
        tokens["attention_mask"] = None
    pad = None if not arm.mask and not b["padding_mask"].any() else b["padding_mask"].to(device)
    return {"mel": b["mel"].to(device), "padding_mask": pad, "tokens": tokens}


def set_tf32(device, on):
    if device.type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9, as pretrain.make_fast
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def make_arm(arm, base, batches, device, amp):
    """The arm's own model copy, optimizer and step() (one training step; no sync at its end)."""
    import pretrain
    model = copy.deepcopy(base)
    if arm.bert_attention == "eager":  # transformers' unfused attention; its own 2-D mask handling
        model.text_encoder.model.set_attn_implementation("eager")
        model.text_encoder.mask_4d = False
    model.to(device)
    if arm.compile:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        model.audio_encoder.compile(dynamic=False)
        model.text_encoder.model.compile(dynamic=False)
    optimizer = pretrain.build_optimizer(model, pretrain.PretrainConfig(), device.type)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = arm_batch(arm, batches, device)
    counts = {"skipped": 0}

    def step():
        set_tf32(device, arm.tf32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(batch, stage=1)[0]
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if arm.host_sync and not math.isfinite(float(norm)):  # the old loop's check: a host read
            counts["skipped"] += 1
            optimizer.zero_grad(set_to_none=True)
            return
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scales()
        if arm.host_sync:
            float(loss.detach())  # the old loop's per-step log read

    text_len = batch["tokens"]["input_ids"].shape[1]
    return {"step": step, "model": model, "text_len": text_len, "counts": counts}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _range(xs):
    return [min(xs), statistics.median(xs), max(xs)] if xs else None


def alternate(arms, device, rounds, burst, deadline, say=print, min_rounds=2):
    """Each round runs every arm's `burst` steps back to back (timed to a sync at the end), the arms'
    order rotated each round -> {name: [seconds per step, one per round]}. Stops early at `deadline`,
    after min_rounds."""
    names = [n for n in arms if "step" in arms[n]]
    times = {n: [] for n in names}
    for r in range(rounds):
        if r >= min_rounds and time.monotonic() > deadline:
            say(f"  device_bench: deadline after {r} rounds")
            break
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t = time.perf_counter()
            for _ in range(burst):
                arms[n]["step"]()
            sync(device)
            times[n].append((time.perf_counter() - t) / burst)
    return times


def build_arms(specs, base, batches, device, amp, warmup, say=print):
    """{name: arm dict}; the first `warmup` steps run here (a compile's cost is the first one's time).
    An arm that fails to build or step keeps its error and is left out of the timing."""
    arms = {}
    for spec in specs:
        t = time.perf_counter()
        try:
            arms[spec.name] = make_arm(spec, base, batches, device, amp)
            for i in range(warmup):
                arms[spec.name]["step"]()
                sync(device)
                if i == 0:
                    arms[spec.name]["first_step_s"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 -- one arm's failure is a result; the others still run
            arms[spec.name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        say(f"  device_bench: {spec.name} built and warmed in {time.perf_counter() - t:.1f} s"
            + (f" ({arms[spec.name]['error']})" if "error" in arms[spec.name] else ""))
    return arms


def arm_rows(specs, arms, times, sz, device):
    """One row per arm: samples/s and MFU (min / median / max over rounds), the ratios to the baseline
    and to the row above (medians), the first step's seconds (with --compile: the compile)."""
    import bench
    peak = bench.gpu_peak_flops(device)
    rows, prev, first = [], None, None
    for spec in specs:
        a, row = arms[spec.name], {"name": spec.name, "what": spec.what, "config": asdict(spec)}
        if "skipped" in a:
            rows.append({**row, "skipped": a["skipped"]})
            continue
        if "error" in a or not times.get(spec.name):
            rows.append({**row, "error": a.get("error", "not timed (deadline)")})
            continue
        model = a["model"]
        flops = bench.flops_per_sample(model.cfg, a["text_len"], sz["frames"], model.text_encoder.model.config)
        step_s = _range(times[spec.name])
        rate = [sz["batch"] / s for s in reversed(step_s)]  # min rate from the slowest step
        row.update(step_s=step_s, samples_per_s=rate, rounds=len(times[spec.name]), text_tokens=a["text_len"],
                   flops_per_sample=flops, achieved_flops=[flops * r for r in rate],
                   mfu=[flops * r / peak for r in rate] if peak else None,
                   first_step_s=a.get("first_step_s"), skipped_steps=a["counts"]["skipped"])
        first = first or rate[1]
        row["speedup_vs_first_row"] = rate[1] / first
        row["speedup_vs_previous_row"] = rate[1] / prev if prev else 1.0
        prev = rate[1]
        rows.append(row)
    return rows


def _self_time(event, cuda):
    if cuda:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
    return event.self_cpu_time_total


def top_kernels(step, device, steps=3, top=5):
    """torch.profiler over `steps` steps -> the `top` kernels by self CUDA time (on a CPU: the ops by
    self CPU time): name, ms per step, share of the total, calls per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    averages = list(prof.key_averages())
    events = [e for e in averages
              if (e.device_type == DeviceType.CUDA if cuda else not e.key.startswith("ProfilerStep"))]
    by = "self CUDA time" if cuda else "self CPU time"
    if cuda and not any(_self_time(e, cuda) for e in events):  # a torch whose kernels carry no row of their own
        events, by = averages, "self CUDA time of the ops (no kernel rows)"
    total = sum(_self_time(e, cuda) for e in events) or 1
    events.sort(key=lambda e: _self_time(e, cuda), reverse=True)
    return {"by": by, "total_ms_per_step": total / 1e3 / steps,
            "top": [{"name": e.key[:160], "ms_per_step": _self_time(e, cuda) / 1e3 / steps,
                     "share": _self_time(e, cuda) / total, "calls_per_step": e.count / steps} for e in events[:top]]}


def run_bench(device, tiny=False, batch=None, rounds=5, burst=3, warmup=2, budget_s=240, say=print, save=None,
              after_group=None):
    """The chain, text and compile rows, each group alternating in one process -> {"sizes", "amp", "chain",
    "text", "compile", "peak_memory_gb", "seconds"}.
    The compile group comes last: a cold compile of both towers takes minutes, and a caller's time box
    then still has the eager rows. save(partial), if given, is called after each group, and
    after_group(name, arms), if given, before it (tools/device_run.py profiles the arms there)."""
    sz = sizes(tiny, batch)
    base = base_model(tiny)
    batches = make_batches(sz, base.text_encoder.model.config.vocab_size)
    out = {"sizes": sz, "amp": "bf16" if sz["amp"] and device.type == "cuda" else "fp32"}
    amp = out["amp"] == "bf16"
    # a cold compile takes minutes on a CPU (seen: 217 s for the tiny model on 2 busy cores)
    skip = {"compile": "--tiny on a CPU: a cold compile takes minutes (tests/test_fast_path.py checks it)"} \
        if tiny and device.type == "cpu" else {}
    t0 = time.monotonic()
    groups = (("chain", chain_arms()[:-1]), ("text", text_arms()), ("compile", compile_arms()))
    for i, (group, specs) in enumerate(groups):
        if group == "compile" and skip:
            out[group] = [{"name": a.name, "what": a.what, "config": asdict(a), "skipped": skip["compile"]}
                          for a in specs]
            continue
        # each group gets an equal share of what is left of the budget for its timed rounds
        deadline = time.monotonic() + (t0 + budget_s - time.monotonic()) / (len(groups) - i)
        arms = build_arms(specs, base, batches, device, amp, warmup, say)
        times = alternate(arms, device, rounds, burst, deadline, say)
        out[group] = arm_rows(specs, arms, times, sz, device)
        if after_group:
            after_group(group, arms)
        del arms  # their memory goes back before the next group's models are built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if save:
            save(dict(out))
    out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out["seconds"] = time.monotonic() - t0
    return out


PROFILED = ("baseline", "tf32", "compile")  # before, today's configuration, after


def fastest_row(bench_out):
    rows = [r for g in ("chain", "compile") for r in bench_out.get(g, []) if "samples_per_s" in r]
    return max(rows, key=lambda r: r["samples_per_s"][1])["name"] if rows else None


def profile_arms(arms, device, names=PROFILED, steps=3):
    """Top-5 kernels of the named arms that were built (of run_bench's arms; PROFILED: the baseline
    "before", today's configuration, the compiled step "after") -> {arm name: top_kernels or error}."""
    out = {}
    for n in [n for n in names if n in arms]:
        arm = arms[n]
        if "step" not in arm:
            out[n] = {"error": arm.get("error", arm.get("skipped", "arm not built"))}
            continue
        try:
            out[n] = top_kernels(arm["step"], device, steps)
        except Exception as e:  # noqa: BLE001 -- recorded, the rest of the run goes on
            out[n] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
    return out


def print_rows(result):
    for group in ("chain", "text", "compile"):
        for r in result.get(group, []):
            if "samples_per_s" not in r:
                print(f"{group:5s} {r['name']:20s} {'FAILED: ' + r['error'] if 'error' in r else r['skipped']}")
                continue
            lo, med, hi = r["samples_per_s"]
            mfu = f"MFU {100 * r['mfu'][1]:.1f}%" if r["mfu"] else ""
            print(f"{group:5s} {r['name']:20s} {med:9.2f} samples/s ({lo:.2f}-{hi:.2f}) "
                  f"x{r['speedup_vs_previous_row']:.2f}"
                  f" vs above, x{r['speedup_vs_first_row']:.2f} vs first {mfu}  {r['what']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model and batch (a CPU check of the script)")
    p.add_argument("--batch", type=int, default=None, help="songs per step (default 100, --tiny 4)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file for the rows and profiles")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    profiles = {}
    result = run_bench(device, args.tiny, args.batch, args.rounds,
                       after_group=lambda group, arms: profiles.update(profile_arms(arms, device)))
    result["profile"] = {"fastest": fastest_row(result), **profiles}
    print_rows(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
