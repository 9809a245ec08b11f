"""Stage 1: contrastive pre-training of full-song audio against song text (HTCL Sec. 2.1).

    python data.py prepare --catalog CATALOG --cache CACHE          # once: log-mels into a memory-mapped cache
    accelerate launch pretrain.py --catalog CATALOG --cache CACHE --out_dir runs/pretrain
    accelerate launch pretrain.py --preset sample_data/preset.toml  # the bundled demo
    python pretrain.py -h                                             # every option, with its default

The final artifact (runs/pretrain/final: config.json + model.safetensors +
tokenizer) is what finetune.py and evaluate.py load.

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
import re
import shutil
import sys
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
    warmup_ratio: float = 0.05        # NOTE(paper): no schedule in paper or released code; warmup + cosine here
    max_grad_norm: float = 1.0        # NOTE(paper): no clipping in the released code; guards the from-scratch encoder
    seed: int = 3407                  # released code
    max_text_length: int = 512        # BERT's limit; lyrics are truncated (Sec. 2.1)
    mixed_precision: str = ""         # "" = whatever `accelerate launch --mixed_precision` says; or no / bf16 / fp16
    num_workers: int = 4              # DataLoader workers per process
    log_every: int = 50               # optimizer steps between log lines
    keep_checkpoints: int = 2         # checkpoints/epoch_* kept for --resume (each holds optimizer state)
    resume: bool = False              # continue from the last checkpoint in out_dir
    max_steps: int = 0                # > 0: stop after this many optimizer steps (smoke runs)


@dataclass
class PretrainConfig(TrainConfig):
    model: htcl.HTCLConfig = field(default_factory=htcl.HTCLConfig)


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
            yield from _flatten_toml(v, prefix + k + ".")
        else:
            yield prefix + k, v


def parse_config(cls, section, argv=None):
    """Build `cls` from its defaults, then `--preset FILE.toml` ([section] table), then CLI flags.

    Every field (nested ones as --model.audio.layers) becomes a flag with its
    default in -h; unknown flags and unknown preset keys are errors.
    """
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
            values[name] = tuple(v) if isinstance(flat[name], tuple) else v
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


def lr_lambda(total_steps, warmup_steps):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def build_optimizer(model, cfg, on_cuda):
    """Adam with two learning rates: the text model gets cfg.text_lr, everything else cfg.lr."""
    text, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (text if name.startswith("text_encoder.") else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr}, {"params": text, "lr": cfg.text_lr}]
    return torch.optim.Adam([g for g in groups if g["params"]], fused=on_cuda)  # Sec. 3.1.3: Adam, no weight decay


def _checkpoints(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "epoch_*")))


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
        raise SystemExit(f"global_batch {cfg.global_batch} is not a multiple of batch_per_device "
                         f"{cfg.batch_per_device} x {world} processes")
    accum = cfg.global_batch // (cfg.batch_per_device * world)
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision or None, gradient_accumulation_steps=accum,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(cfg.seed)
    is_main = accelerator.is_main_process

    def say(msg):  # main process only, and above the progress bar rather than through it
        if is_main:
            tqdm.write(msg)

    collate = data.Collator(tokenizer, cfg.max_text_length)
    on_cuda = accelerator.device.type == "cuda"
    loader_kw = dict(collate_fn=collate, num_workers=cfg.num_workers, pin_memory=on_cuda,
                     persistent_workers=cfg.num_workers > 0)
    if len(train_set) < cfg.batch_per_device * world:
        raise SystemExit(f"{len(train_set)} training samples are fewer than one batch "
                         f"({cfg.batch_per_device} x {world} processes)")
    # drop_last: the gathered contrastive loss needs the same batch on every process.
    train_loader = torch.utils.data.DataLoader(train_set, cfg.batch_per_device, shuffle=True, drop_last=True, **loader_kw)
    # Validation keeps every sample: Accelerate's even_batches tops up the last batch from the
    # start so every process gathers the same size, and gather_for_metrics drops the extras.
    val_loader = torch.utils.data.DataLoader(val_set, cfg.batch_per_device, **loader_kw)
    song_loader = torch.utils.data.DataLoader(song_set, cfg.batch_per_device, **loader_kw)

    optimizer = build_optimizer(model, cfg, on_cuda)
    steps_per_epoch = len(train_loader) // (accum * world)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, int(cfg.warmup_ratio * total_steps)))
    model, optimizer, train_loader, val_loader, song_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, song_loader)
    # The scheduler is stepped by hand once per optimizer step (not through prepare,
    # which would scale it by the number of processes); registered so save_state keeps it.
    accelerator.register_for_checkpointing(scheduler)
    net = accelerator.unwrap_model(model)

    start_epoch, step = 0, 0
    if cfg.resume and _checkpoints(cfg.out_dir):
        last = _checkpoints(cfg.out_dir)[-1]
        accelerator.load_state(last)
        with open(os.path.join(last, "progress.json")) as f:
            progress = json.load(f)
        start_epoch, step = progress["epoch"] + 1, progress["step"]
        say(f"resumed from {last}: epoch {start_epoch}, step {step}")
    elif cfg.resume:
        say(f"--resume: no checkpoint in {cfg.out_dir}/checkpoints, starting fresh")

    batch_global = cfg.batch_per_device * world  # negatives per contrastive loss
    say(f"stage {stage}: {len(train_set)} train / {len(val_set)} val samples, {len(song_set)} held-out songs | "
        f"{world} process(es) x {cfg.batch_per_device} x {accum} accumulation = global batch {cfg.global_batch} | "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps | {sum(p.numel() for p in net.parameters()):,} params")
    if is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a")

    metrics = {}
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if step >= total_steps:
            break
        train_loader.set_epoch(epoch)
        t0, seen, interval_loss, interval_parts, interval_n = time.time(), 0, 0.0, {}, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}", disable=None if is_main else True, leave=False)  # None: off when not a terminal
        for batch in bar:
            with accelerator.accumulate(model):
                loss, parts = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            seen += batch_global
            interval_loss += loss.item()
            for k, v in parts.items():
                interval_parts[k] = interval_parts.get(k, 0.0) + v.item()
            interval_n += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            net.clamp_logit_scales()
            step += 1
            if step % cfg.log_every == 0 or step == total_steps:
                temps = " ".join(f"{k} {1 / v.exp().item():.4f}" for k, v in net.logit_scale.items() if v.requires_grad)
                rec = {"stage": stage, "epoch": epoch, "step": step, "loss": interval_loss / interval_n,
                       "ln_B": math.log(batch_global), "lr": scheduler.get_last_lr()[0],
                       "samples_per_s": seen / (time.time() - t0),
                       **{f"loss_{k}": v / interval_n for k, v in interval_parts.items()}}
                detail = f" ({' '.join(f'{k} {v / interval_n:.3f}' for k, v in interval_parts.items())})" \
                    if len(interval_parts) > 1 else ""
                say(f"step {step:>6}/{total_steps} | loss {rec['loss']:.4f}{detail} | ln(B) {rec['ln_B']:.4f} | "
                    f"lr {rec['lr']:.2e} | temp {temps} | {rec['samples_per_s']:.1f} samples/s")
                if is_main:
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                t0, seen, interval_loss, interval_parts, interval_n = time.time(), 0, 0.0, {}, 0
            if step >= total_steps:
                break
        bar.close()

        metrics = validate(accelerator, model, loss_fn, val_loader, song_loader)
        say(f"epoch {epoch} | " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in metrics.items()))
        if is_main:
            log_file.write(json.dumps({"stage": stage, "epoch": epoch, "step": step, **metrics}) + "\n")
            log_file.flush()
        save_checkpoint(accelerator, cfg, epoch, step)

    accelerator.wait_for_everyone()
    if is_main:
        final = os.path.join(cfg.out_dir, "final")
        htcl.save_artifact(net, tokenizer, final, extra={"stage": stage, **asdict(cfg), **metrics})
        say(f"wrote {final}")
        log_file.close()
    accelerator.end_training()
    return metrics


def save_checkpoint(accelerator, cfg, epoch, step):
    """accelerator.save_state into a temporary folder, renamed when complete, so a
    kill at any moment leaves the previous checkpoint intact."""
    root = os.path.join(cfg.out_dir, "checkpoints")
    final, tmp = os.path.join(root, f"epoch_{epoch:04d}"), os.path.join(root, f".tmp_epoch_{epoch:04d}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "progress.json"), "w") as f:
            json.dump({"epoch": epoch, "step": step}, f)
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
    train_rows = data.split_rows(catalog, "train", seed=cfg.seed)
    val_rows = data.split_rows(catalog, "val", seed=cfg.seed)
    return catalog, cache, train_rows, val_rows


def main(argv=None):
    cfg = parse_config(PretrainConfig, "pretrain", argv)
    from transformers import AutoTokenizer
    catalog, cache, train_rows, val_rows = load_songs(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.text_model)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = htcl.HTCL(cfg.model)
    model.freeze_unused(stage=1)
    val_set = data.SongDataset(catalog, val_rows, cache)
    train(cfg, model, tokenizer, stage1_loss, data.SongDataset(catalog, train_rows, cache), val_set, val_set, stage=1)


if __name__ == "__main__":
    main()
