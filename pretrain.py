"""Stage 1: contrastive pre-training of full-song audio against song text (HTCL Sec. 2.1).

    python data.py prepare --catalog CATALOG --cache CACHE          # once: log-mels into a memory-mapped cache
    accelerate launch pretrain.py --catalog CATALOG --cache CACHE --out_dir runs/pretrain
    accelerate launch pretrain.py --preset sample_data/preset.toml  # the bundled demo
    accelerate launch pretrain.py --preset presets/crossmusim.toml  # the CrossMuSim variant (paper-notes Sec. 2)
    python pretrain.py -h                                             # every option, with its default

The final artifact (runs/pretrain/final: config.json + model.safetensors +
tokenizer) is what finetune.py and evaluate.py load. Each run also writes log.jsonl and
curves.png (plot_curves, redrawn at every epoch's end on a background thread); --report_to tensorboard sends the
same numbers to an Accelerate tracker. Relative paths in a preset are read from its folder.

This file also holds what both stages share: the dataclass -> CLI config, the
training loop (Accelerate: prepare / accumulate / backward, warmup + cosine,
clipping, checkpoints, resume) and the per-epoch validation. finetune.py
imports them, so the loop exists once.
"""
import argparse
import dataclasses
import glob
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

import data
import model as htcl

# -----------------------------------------------------------------------------
# Config: one dataclass per stage, CLI flags generated from it.


@dataclass
class TrainConfig:
    """What both stages share. Defaults are stage 1's; FinetuneConfig overrides."""
    catalog: str = ""                 # songs: song_id, audio, title, artists, lyrics, [split, labels...]
    cache: str = ""                   # mel cache from `data.py prepare`; empty = decode audio on the fly
    out_dir: str = "runs/pretrain"
    epochs: int = 20                  # released code
    global_batch: int = 800           # Sec. 3.1.3: 8 x A100, global batch 800
    batch_per_device: int = 100       # 800 / 8 GPUs; fewer GPUs -> gradient accumulation makes up the rest
    lr: float = 1e-3                  # Sec. 3.1.3: Adam, 1e-3 for the audio encoder, heads and temperature
    text_lr: float = 3e-5             # Sec. 2.1: small BERT lr against catastrophic forgetting
    audio_lr: float = 0.0             # audio encoder's lr; 0 = lr (paper: one lr; released stage 2: 1e-5, heads 1e-4)
    warmup_ratio: float = 0.05        # NOTE(paper): no schedule in paper or released code; warmup + cosine here
    warmup_epochs: float = 0.0        # > 0: warm up over this many epochs instead of warmup_ratio (CrossMuSim: 1)
    lr_schedule: str = "cosine"       # cosine (after the warmup) | constant (released code: no schedule)
    max_grad_norm: float = 1.0        # NOTE(paper): no clipping in the released code; guards the from-scratch encoder
    seed: int = 3407                  # released code
    max_text_length: int = 512        # BERT's limit; lyrics are truncated (Sec. 2.1)
    max_val_songs: int = 10000        # held-out songs scored each epoch (seeded sample): R@K is N x N, and 10% of 50M songs is too many
    mixed_precision: str = ""         # "" = whatever `accelerate launch --mixed_precision` says; or no / bf16 / fp16
    num_workers: int = 4              # DataLoader workers per process
    log_every: int = 50               # optimizer steps between log lines
    checkpoint_every: int = 2000      # optimizer steps between mid-epoch checkpoints (an epoch at paper scale is ~62k steps); 0 = epoch ends only
    keep_checkpoints: int = 2         # newest checkpoints/step_* kept for --resume (each holds optimizer state)
    max_nonfinite_steps: int = 10     # skip a step whose loss/gradient is NaN/inf; stop after this many in a row
    resume: bool = False              # continue from the last checkpoint in out_dir
    max_steps: int = 0                # > 0: stop after this many optimizer steps (smoke runs)
    report_to: str = "none"           # Accelerate tracker for the curves: none | tensorboard (pip install tensorboard) | wandb | ...


@dataclass
class PretrainConfig(TrainConfig):
    model: htcl.HTCLConfig = field(default_factory=htcl.HTCLConfig)
    # The CrossMuSim variant (paper-notes Sec. 2; presets/crossmusim.toml) is this stage with
    # another sampling: each text type its own sample, paired with a random crop of
    # model.chunk_seconds. The defaults are HTCL's (a whole song with its text X_t).
    samples: str = "song"             # song (HTCL Sec. 2.1) | crossmusim (a crop + one text type per sample)
    text_types: tuple = ("aspects", "caption", "lyrics")  # CrossMuSim: each text type is its own sample
    aspect_column: str = "aspects"    # catalog column of tag keywords (comma separated); absent = no aspect samples
    caption_column: str = "caption"   # catalog column of captions; absent = no caption samples
    max_aspects: int = 5              # CrossMuSim: up to 5 random keywords


def _flat_fields(cls, prefix=""):
    """Yield (dotted name, field) for a dataclass, descending into nested dataclass fields."""
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _flat_fields(type(default), prefix + f.name + ".")
        elif f.name != "text_model_config":  # filled in by the model, not a knob
            yield prefix + f.name, default


def _field_comments(cls):
    """{field: its trailing '# comment'} from the dataclass source: the citation shown by -h."""
    out = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                m = re.match(r"\s+(\w+): [^#]*#\s*(.*)", line)
                if m:
                    out[m.group(1)] = m.group(2)
    return out


def _flatten_toml(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten_toml(v, prefix + str(k) + ".")
        else:
            yield prefix + str(k), v


# Fields holding a path. In a preset a relative path is read from the preset file's folder, so a
# preset works from any working directory; on the command line it stays relative to the cwd.
# text_model may also be a hub name: it is resolved only when that folder exists.
PATH_FIELDS = ("catalog", "cache", "out_dir", "init_from", "pairs", "model.text_model")


def _preset_path(preset, name, value):
    if name not in PATH_FIELDS or not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(preset)), value))
    return value if name == "model.text_model" and not os.path.isdir(path) else path


def usage_hint(script, needs):
    """What a stage needs and the one command that runs the demo: printed when run with no arguments."""
    return (f"{script}: nothing to train on: give {needs},\n"
            f"or a preset that sets them (--preset FILE.toml). Every option: python {script} -h\n"
            f"The bundled demo (a few minutes on a CPU): bash sample_data/demo.sh, or this stage alone:\n"
            f"  accelerate launch {script} --preset sample_data/preset.toml")


def exit_with_usage(script, needs):
    """Print usage_hint and exit. Exit status 2 (a usage error), except under `accelerate launch`,
    which turns any non-zero exit of the script into its own traceback: there the hint is the answer,
    as -h is, and exits 0."""
    print(usage_hint(script, needs), file=sys.stderr)
    raise SystemExit(0 if "ACCELERATE_MIXED_PRECISION" in os.environ else 2)


def parse_config(cls, section, argv=None, needs=None):
    """Build `cls` from its defaults, then `--preset FILE.toml` ([section] table), then CLI flags.
    With no argument at all and `needs` given (what the stage cannot run without), print
    usage_hint instead and exit.

    Every field (nested ones as --model.audio.layers) becomes a flag with its
    default in -h; unknown flags and unknown preset keys are errors. Relative paths
    in a preset are read from its folder (PATH_FIELDS).
    """
    if needs and not (sys.argv[1:] if argv is None else argv):
        exit_with_usage(os.path.basename(sys.modules[cls.__module__].__file__), needs)
    flat = dict(_flat_fields(cls))
    comments = {**_field_comments(htcl.AudioConfig), **_field_comments(htcl.HTCLConfig), **_field_comments(cls)}
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"TOML file whose [{section}] table overrides the defaults")
    for name, default in flat.items():
        short = name.split(".")[-1]
        why = comments.get(short, "").replace("%", "%%")
        if isinstance(default, bool):
            p.add_argument("--" + name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{why} (default: {default})")
        elif isinstance(default, tuple):
            p.add_argument("--" + name, nargs="+", type=type(default[0]), default=None, metavar=short.upper(),
                           help=f"{why} (default: {' '.join(map(str, default))})")
        else:
            p.add_argument("--" + name, type=type(default), default=None, metavar=short.upper(),
                           help=f"{why} (default: {default!r})")
    args = vars(p.parse_args(argv))

    values = {}
    path = args.pop("preset")
    if path:
        with open(path, "rb") as f:
            table = tomllib.load(f).get(section, {})
        for name, v in _flatten_toml(table):
            if name not in flat:
                raise SystemExit(f"{path}: [{section}] has unknown key {name!r}")
            values[name] = tuple(v) if isinstance(flat[name], tuple) else _preset_path(path, name, v)
    values.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None})

    cfg = cls()
    for name, v in values.items():
        obj, *path, last = [cfg] + name.split(".")
        for part in path:
            obj = getattr(obj, part)
        default = getattr(obj, last)
        if isinstance(default, float) and isinstance(v, int):
            v = float(v)
        if type(v) is not type(default):
            raise SystemExit(f"{name}: expected {type(default).__name__}, got {v!r}")
        setattr(obj, last, v)
    return cfg


# -----------------------------------------------------------------------------
# Validation: loss plus audio <-> text retrieval on held-out songs.


@torch.no_grad()
def embed_songs(accelerator, model, loader):
    """Audio and text embeddings of every song in `loader`, each exactly once, on every process."""
    model.eval()
    net = accelerator.unwrap_model(model)
    audio, text = [], []
    for batch in loader:
        with accelerator.autocast():
            a = net.encode_audio(batch["mel"], batch["padding_mask"])
            t = net.encode_text(batch["tokens"])
        audio.append(accelerator.gather_for_metrics(a.float()))
        text.append(accelerator.gather_for_metrics(t.float()))
    return torch.cat(audio), torch.cat(text)


@torch.no_grad()
def validate(accelerator, model, loss_fn, val_loader, song_loader):
    """Mean validation loss and audio->text / text->audio R@1, R@10 (chance: k / N)."""
    from evaluate import recall_at_k
    model.eval()
    losses = []
    for batch in val_loader:
        with accelerator.autocast():
            loss, _ = loss_fn(model, batch)
        losses.append(accelerator.gather_for_metrics(loss.detach().float().reshape(1)))
    metrics = {"val_loss": torch.cat(losses).mean().item() if losses else float("nan")}
    audio_emb, text_emb = embed_songs(accelerator, model, song_loader)
    n = audio_emb.shape[0]
    for k in (1, 10):
        metrics[f"a2t_R@{k}"] = recall_at_k(audio_emb, text_emb, k)
        metrics[f"t2a_R@{k}"] = recall_at_k(text_emb, audio_emb, k)
    metrics["chance_R@10"] = min(1.0, 10 / max(n, 1))
    metrics["val_songs"] = n
    model.train()
    return metrics


# -----------------------------------------------------------------------------
# The training loop, shared by both stages.


def lr_lambda(total_steps, warmup_steps, schedule="cosine"):
    if schedule not in ("cosine", "constant"):
        raise SystemExit(f"--lr_schedule must be cosine or constant, not {schedule!r}")

    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def build_optimizer(model, cfg, device_type):
    """Adam with up to three learning rates: the text model gets cfg.text_lr, the audio encoder
    cfg.audio_lr (0: cfg.lr), everything else (heads, fusion, temperatures) cfg.lr."""
    text, audio, rest = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (text if name.startswith("text_encoder.") else
             audio if name.startswith("audio_encoder.") else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr}, {"params": audio, "lr": cfg.audio_lr or cfg.lr},
              {"params": text, "lr": cfg.text_lr}]
    # Fused Adam on CPU and CUDA: one kernel for all tensors (bench.py, paper size on CPU: 0.19 s
    # a step against 6.7 s for the per-tensor loop); other devices keep torch's default.
    fused = True if device_type in ("cpu", "cuda") else None
    return torch.optim.Adam([g for g in groups if g["params"]], fused=fused)  # Sec. 3.1.3: Adam, no weight decay


def _checkpoints(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*")))  # zero-padded: sorted = by step


def train(cfg, model, tokenizer, loss_fn, train_set, val_set, song_set, stage):
    """Train `model` with `loss_fn(model, batch) -> (loss, parts)`; write out_dir/final.

    train_set / val_set yield what loss_fn needs; song_set yields held-out songs
    for the retrieval metrics. Returns the last validation metrics.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, set_seed

    # Several processes without CUDA (torchrun, or `accelerate launch --multi_gpu` on a CPU box):
    # ask Accelerate for gloo on CPU, which it only does when told cpu=True.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    world = PartialState(cpu=cpu).num_processes
    if cfg.global_batch % (cfg.batch_per_device * world):
        raise SystemExit(f"--global_batch {cfg.global_batch} is not a multiple of --batch_per_device "
                         f"{cfg.batch_per_device} x {world} processes; set both (e.g. --global_batch 32 "
                         f"--batch_per_device 32 for a small catalog)")
    accum = cfg.global_batch // (cfg.batch_per_device * world)
    trackers = _trackers(cfg.report_to)
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision or None, gradient_accumulation_steps=accum,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
                              log_with=trackers, project_dir=cfg.out_dir if trackers else None)
    if trackers:  # e.g. tensorboard --logdir runs/demo/pretrain
        accelerator.init_trackers(f"stage{stage}", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                           for k, v in _flatten_toml(asdict(cfg))})
    set_seed(cfg.seed)
    is_main = accelerator.is_main_process

    def say(msg):  # main process only, and above the progress bar rather than through it
        if is_main:
            tqdm.write(msg)

    collate = data.Collator(tokenizer, cfg.max_text_length)
    on_cuda = accelerator.device.type == "cuda"
    # A dataset that draws per epoch (CrossMuSim crops) is told the epoch before each pass; its
    # workers must then be started afresh each epoch, so they hold the dataset with that epoch.
    redraws = hasattr(train_set, "set_epoch")
    loader_kw = dict(collate_fn=collate, num_workers=cfg.num_workers, pin_memory=on_cuda,
                     persistent_workers=cfg.num_workers > 0 and not redraws)
    if len(train_set) < cfg.batch_per_device * world:
        raise SystemExit(f"{len(train_set)} training samples are fewer than one batch "
                         f"(--batch_per_device {cfg.batch_per_device} x {world} processes): lower "
                         f"--global_batch and --batch_per_device (global = per device x processes x accumulation)")
    # drop_last: the gathered contrastive loss needs the same batch on every process.
    # Own generator: creating a loader iterator then draws no number from the global RNG, so
    # dropout after a mid-epoch resume sees the same random stream as an uninterrupted run.
    train_loader = torch.utils.data.DataLoader(train_set, cfg.batch_per_device, shuffle=True, drop_last=True,
                                               generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)
    # Validation keeps every sample: Accelerate's even_batches tops up the last batch from the
    # start so every process gathers the same size, and gather_for_metrics drops the extras.
    val_loader = torch.utils.data.DataLoader(val_set, cfg.batch_per_device, **loader_kw)
    song_loader = torch.utils.data.DataLoader(song_set, cfg.batch_per_device, **loader_kw)

    optimizer = build_optimizer(model, cfg, accelerator.device.type)
    steps_per_epoch = len(train_loader) // (accum * world)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch) if cfg.warmup_epochs > 0 else int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup_steps, cfg.lr_schedule))
    model, optimizer, train_loader, val_loader, song_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, song_loader)
    # The scheduler is stepped by hand once per optimizer step (not through prepare,
    # which would scale it by the number of processes); registered so save_state keeps it.
    accelerator.register_for_checkpointing(scheduler)
    net = accelerator.unwrap_model(model)

    # progress = where the next batch starts: the epoch, optimizer steps so far, and micro-batches
    # already consumed in that epoch (non-zero after a mid-epoch checkpoint).
    progress = {"epoch": 0, "step": 0, "batches": 0}
    if cfg.resume and _checkpoints(cfg.out_dir):
        last = _checkpoints(cfg.out_dir)[-1]
        accelerator.load_state(last)  # model, optimizer, scheduler, RNG states
        with open(os.path.join(last, "progress.json")) as f:
            progress = json.load(f)
        say(f"resumed from {last}: epoch {progress['epoch']}, step {progress['step']}, "
            f"{progress['batches']} batches into the epoch")
    elif cfg.resume:
        say(f"--resume: no checkpoint in {cfg.out_dir}/checkpoints, starting fresh")

    batch_global = cfg.batch_per_device * world  # negatives per contrastive loss
    say(f"stage {stage}: {len(train_set)} train / {len(val_set)} val samples, {len(song_set)} held-out songs | "
        f"{world} process(es) x {cfg.batch_per_device} x {accum} accumulation = global batch {cfg.global_batch} | "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps | {sum(p.numel() for p in net.parameters()):,} params")
    log = IntervalLog(cfg.out_dir if is_main else None, say, stage, batch_global, total_steps,
                      accelerator if trackers else None)

    curves = CurvePlotter(os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "curves.png"),
                          say) if is_main else None
    metrics, step, nonfinite_run = {}, progress["step"], 0
    model.train()
    for epoch in range(progress["epoch"], cfg.epochs):
        if step >= total_steps:
            break
        skip = progress["batches"] if epoch == progress["epoch"] else 0
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        loader.set_epoch(epoch)  # the same shuffle as an uninterrupted run, also for the skipping loader
        if redraws:
            train_set.set_epoch(epoch)  # the same crops and texts as an uninterrupted run
        batches = skip
        for batch in tqdm(loader, desc=f"epoch {epoch}", initial=skip, total=len(train_loader),
                          disable=None if is_main else True, leave=False):  # None: no bar unless a terminal
            batches += 1
            with accelerator.accumulate(model):
                loss, parts = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # The norm of the all-reduced gradient is the same on every process, so all
                    # of them skip a non-finite step together (no DDP hang).
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                    finite = bool(torch.isfinite(grad_norm))
                    if finite:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            log.add(loss, parts)
            if not accelerator.sync_gradients:
                continue
            if not finite:
                nonfinite_run += 1
                log.skipped += 1
                say(f"step {step + 1}: non-finite loss/gradient (loss {loss.item()}), update skipped "
                    f"({nonfinite_run} in a row, {log.skipped} in all)")
                if nonfinite_run >= cfg.max_nonfinite_steps:
                    raise SystemExit(f"{nonfinite_run} non-finite steps in a row: stopping. The last checkpoint "
                                     f"in {cfg.out_dir}/checkpoints is intact; try a lower --lr, "
                                     f"--mixed_precision no, or check the data.")
                continue
            nonfinite_run = 0
            scheduler.step()
            net.clamp_logit_scales()
            step += 1
            log.step(epoch, step, scheduler.get_last_lr()[0], net, force=step % cfg.log_every == 0 or step == total_steps)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batches < len(train_loader):
                save_checkpoint(accelerator, cfg, {"epoch": epoch, "step": step, "batches": batches})
            if step >= total_steps:
                break

        metrics = validate(accelerator, model, loss_fn, val_loader, song_loader)
        say(f"epoch {epoch} | " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in metrics.items()))
        log.write({"stage": stage, "epoch": epoch, "step": step, "skipped_nonfinite": log.skipped, **metrics})
        if curves:
            curves.request()
        save_checkpoint(accelerator, cfg, {"epoch": epoch + 1, "step": step, "batches": 0})

    if curves:
        curves.close()
    accelerator.wait_for_everyone()
    if is_main:
        final = os.path.join(cfg.out_dir, "final")
        htcl.save_artifact(net, tokenizer, final, extra={"stage": stage, **asdict(cfg), **metrics})
        say(f"wrote {final}")
    log.close()
    accelerator.end_training()
    return {**metrics, "skipped_nonfinite": log.skipped}


def _trackers(report_to):
    """--report_to -> Accelerate's log_with (None for none); tensorboard is an optional extra."""
    if report_to in ("", "none"):
        return None
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (only to say what is missing, before Accelerate does)
        except ImportError:
            raise SystemExit("--report_to tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or --report_to none; curves.png is drawn either way)") from None
    return report_to


class IntervalLog:
    """One line per log interval: step, loss (parts), chance level ln(B), lr, temperatures,
    samples/s; also appended to out_dir/log.jsonl, and sent to the Accelerate trackers
    (--report_to). Non-finite losses are left out of the means."""

    def __init__(self, out_dir, say, stage, batch_global, total_steps, accelerator=None):
        self.say, self.stage, self.batch_global, self.total_steps = say, stage, batch_global, total_steps
        self.accelerator = accelerator
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, "log.jsonl"), "a") if out_dir else None
        self.skipped = 0
        self.reset()

    def reset(self):
        self.t0, self.n, self.loss, self.parts = time.time(), 0, 0.0, {}

    def add(self, loss, parts):
        loss = loss.item()
        if math.isfinite(loss):
            self.n += 1
            self.loss += loss
            for k, v in parts.items():
                self.parts[k] = self.parts.get(k, 0.0) + v.item()

    def step(self, epoch, step, lr, net, force):
        if not force or not self.n:
            return
        parts = {k: v / self.n for k, v in self.parts.items()}
        rec = {"stage": self.stage, "epoch": epoch, "step": step, "loss": self.loss / self.n,
               "ln_B": math.log(self.batch_global), "lr": lr,
               "samples_per_s": self.n * self.batch_global / (time.time() - self.t0),
               **{f"loss_{k}": v for k, v in parts.items()}}
        detail = f" ({' '.join(f'{k} {v:.3f}' for k, v in parts.items())})" if len(parts) > 1 else ""
        temps = {k: 1 / v.exp().item() for k, v in net.logit_scale.items() if v.requires_grad}
        rec.update({f"temp_{k}": v for k, v in temps.items()})
        temps = " ".join(f"{k} {v:.4f}" for k, v in temps.items()) \
            or f"{1 / math.exp(net.cfg.logit_scale_init):.4f} (fixed)"
        self.say(f"step {step:>6}/{self.total_steps} | loss {rec['loss']:.4f}{detail} | ln(B) {rec['ln_B']:.4f} | "
                 f"lr {lr:.2e} | temp {temps} | {rec['samples_per_s']:.1f} samples/s")
        self.write(rec)
        self.reset()

    def write(self, rec):
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=rec["step"])

    def close(self):
        if self.file:
            self.file.close()


class CurvePlotter:
    """Redraws curves.png from log.jsonl at each epoch's end on a background thread, so training
    does not wait for matplotlib (0.6 s a draw measured; the demo's epochs last a few seconds).
    A request while a draw runs is folded into one more draw after it; close() waits for the
    last one (a request made after the last log row has drawn every row). A failed draw is
    reported once and never stops training."""

    def __init__(self, log_path, png_path, say=print):
        self.paths, self.say = (log_path, png_path), say
        self.lock, self.thread, self.running, self.again, self.failed = threading.Lock(), None, False, False, False

    def request(self):
        with self.lock:
            if self.running:
                self.again = True
                return
            self.running = True
        self.thread = threading.Thread(target=self._run, name="curves.png", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            self._draw()
            with self.lock:
                if not self.again:
                    self.running = False
                    return
                self.again = False

    def _draw(self):
        try:
            plot_curves(*self.paths)
        except Exception as e:  # a plot is a convenience: say why once, keep training
            if not self.failed:
                self.say(f"warning: could not draw {self.paths[1]}: {type(e).__name__}: {e}")
            self.failed = True

    def close(self):
        """Called by the thread that calls request(), after its last request."""
        if self.thread is None:  # never asked (no epoch ended): draw what there is
            self._draw()
        else:
            self.thread.join()  # the newest thread: it draws every request made before it ends


def plot_curves(log_path, png_path):
    """Draw log.jsonl as png_path: training loss against its chance level ln(B), held-out R@K
    against chance, learning rate, temperatures, each against the optimizer step.
    Returns {panel: {series: (steps, values)}}, what was drawn."""
    from matplotlib.figure import Figure  # no pyplot: files only, no display, no global figure state
    with open(log_path) as f:
        # Complete lines only: training may be appending one right now (CurvePlotter's thread).
        rows = [json.loads(line) for line in f.read().split("\n")[:-1] if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    keys = lambda rows, test: sorted({k for r in rows for k in r if test(k)})  # noqa: E731
    panels = {
        "loss (train) against chance ln(B)": {k: series(train_rows, k) for k in
                                              ["loss", "ln_B"] + keys(train_rows, lambda k: k.startswith("loss_"))},
        "held-out retrieval R@K": {k: series(val_rows, k) for k in
                                   keys(val_rows, lambda k: "_R@" in k)},
        "learning rate": {"lr": series(train_rows, "lr")},
        "temperature": {k: series(train_rows, k) for k in keys(train_rows, lambda k: k.startswith("temp_"))},
    }
    fig = Figure(figsize=(18, 3.6))
    axes = fig.subplots(1, 4)
    for ax, (title, lines) in zip(axes, panels.items()):
        for name, (x, y) in lines.items():
            chance = name in ("ln_B", "chance_R@10")
            ax.plot(x, y, label=name, linestyle="--" if chance else "-", marker="" if len(x) > 1 else "o",
                    color="black" if chance else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        if lines:
            ax.legend(fontsize=7)
    # Fixed margins instead of tight_layout, which measured most of a redraw (0.95 -> 0.45 s):
    # the plot is redrawn at every epoch's end, which in the demo is every few seconds.
    fig.subplots_adjust(left=0.035, right=0.99, bottom=0.15, top=0.9, wspace=0.18)
    fig.savefig(png_path + ".tmp.png", dpi=90)
    os.replace(png_path + ".tmp.png", png_path)  # a reader never sees half a PNG
    return panels


def save_checkpoint(accelerator, cfg, progress):
    """accelerator.save_state into a temporary folder, renamed when complete, so a
    kill at any moment leaves the previous checkpoint intact."""
    root = os.path.join(cfg.out_dir, "checkpoints")
    name = f"step_{progress['step']:09d}"
    final, tmp = os.path.join(root, name), os.path.join(root, ".tmp_" + name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "progress.json"), "w") as f:
            json.dump(progress, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(cfg.out_dir)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# -----------------------------------------------------------------------------
# Stage 1.


def stage1_loss(model, batch):
    return model(batch, stage=1)


def load_songs(cfg):
    """Catalog, optional mel cache, and the train / held-out song rows."""
    if not cfg.catalog:
        raise SystemExit("--catalog is required (or a --preset that sets it)")
    catalog = data.load_catalog(cfg.catalog)
    cache = data.MelCache.open(cfg.cache, catalog) if cfg.cache else None
    if cache is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Straight from audio, a song that fails to decode is dropped from its batch; the gathered
        # loss needs equal batches on every process, and the cache drops such songs up front.
        raise SystemExit(f"several processes need the log-mel cache: python data.py prepare "
                         f"--catalog {cfg.catalog} --cache DIR, then --cache DIR")
    train_rows = data.split_rows(catalog, "train", seed=cfg.seed)
    val_rows = data.split_rows(catalog, "val", seed=cfg.seed)
    if len(val_rows) > cfg.max_val_songs:
        val_rows = sorted(random.Random(cfg.seed).sample(val_rows, cfg.max_val_songs))
    return catalog, cache, train_rows, val_rows


def main(argv=None):
    cfg = parse_config(PretrainConfig, "pretrain", argv,
                       needs="--catalog CATALOG (and --cache CACHE from `data.py prepare`)")
    from transformers import AutoTokenizer
    try:  # before anything slow: a missing text model is one line, in seconds
        cfg.model.text_model = htcl.resolve_text_model(cfg.model.text_model)
    except ValueError as e:  # what was looked for and how to fix it
        raise SystemExit(f"Error: {e}") from None
    catalog, cache, train_rows, val_rows = load_songs(cfg)
    song_set = data.SongDataset(catalog, val_rows, cache)
    # Straight from audio (no cache), a training song that fails to decode is skipped with a
    # warning; held-out songs must all be there, so they raise.
    if cfg.samples == "song":
        train_set, val_set = data.SongDataset(catalog, train_rows, cache, on_error="skip"), song_set
    else:
        train_set, val_set = crossmusim_sets(cfg, catalog, cache, train_rows, val_rows)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.text_model)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = htcl.HTCL(cfg.model)
    model.freeze_unused(stage=1)
    train(cfg, model, tokenizer, stage1_loss, train_set, val_set, song_set, stage=1)


def crossmusim_sets(cfg, catalog, cache, train_rows, val_rows):
    """CrossMuSim samples of the train and held-out songs. The held-out ones keep epoch 0's draws,
    so the validation loss compares like with like across epochs and resumes; the retrieval metrics of
    validate() stay on whole songs and their text X_t."""
    if cfg.samples != "crossmusim":
        raise SystemExit(f"--samples must be song or crossmusim, not {cfg.samples!r}")
    # trained on crops, embedded by chunks of the same length: the artifact says so, and
    # evaluate.py embeds it that way unless told otherwise
    cfg.model.embed_mode = "chunked"
    kw = dict(crop_frames=data.seconds_to_frames(cfg.model.chunk_seconds), seed=cfg.seed, text_types=cfg.text_types,
              aspect_column=cfg.aspect_column, caption_column=cfg.caption_column, max_aspects=cfg.max_aspects)
    try:
        train_set = data.CrossMuSimDataset(catalog, train_rows, cache, on_error="skip", **kw)
        val_set = data.CrossMuSimDataset(catalog, val_rows, cache, redraw=False, **kw)
    except ValueError as e:
        raise SystemExit(f"--text_types: {e}") from None
    if train_set.crop_frames < data.MIN_FRAMES:
        raise SystemExit(f"--model.chunk_seconds {cfg.model.chunk_seconds} gives {train_set.crop_frames} frames, fewer "
                         f"than the audio encoder's {data.MIN_FRAMES}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"crossmusim samples ({cfg.model.chunk_seconds:g} s crops): "
              + ", ".join(f"{n} {t}" for t, n in train_set.counts.items() if n)
              + f" from {len(train_set.rows)} songs (columns: aspects '{cfg.aspect_column}', "
                f"caption '{cfg.caption_column}'; 'song' = no such text, the song's X_t instead)")
    return train_set, val_set


if __name__ == "__main__":
    main()
