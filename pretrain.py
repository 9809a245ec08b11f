"""Stage 1: contrastive pre-training of full-song audio against song text (HTCL Sec. 2.1).

    python data.py prepare --catalog CATALOG --cache CACHE          # once: log-mels into a memory-mapped cache
    accelerate launch pretrain.py --catalog CATALOG --cache CACHE --out_dir runs/pretrain
    python data.py prepare --catalog CATALOG --shards s3://b/mels   # paper scale: tar shards instead (shards.py)
    accelerate launch pretrain.py --catalog CATALOG --shards s3://b/mels --out_dir runs/pretrain  # streamed
    accelerate launch pretrain.py --preset sample_data/preset.toml  # the bundled demo
    accelerate launch pretrain.py --preset presets/crossmusim.toml  # the CrossMuSim variant (a crop + one text type a sample)
    python pretrain.py -h                                             # every option, with its default

The final artifact (runs/pretrain/final: config.json + model.safetensors +
tokenizer) is what finetune.py and evaluate.py load. Each run also writes log.jsonl and
curves.png (training.plot_curves, redrawn at every epoch's end on a background thread); --report_to tensorboard sends the
same numbers to an Accelerate tracker. Relative paths in a preset are read from its folder.

Read top to bottom: the dataclass configs with their sources, then the training loop both
stages run (`train`: Accelerate's prepare / accumulate / backward, warmup + cosine, clipping,
checkpoints, resume), its named steps, the optimizer and schedule, the per-epoch validation,
and stage 1's main. finetune.py imports the loop, so it exists once. The plumbing around the
loop (dataclass -> CLI and presets, log lines and curves, checkpoint files) is in training.py.
"""
import itertools
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

import data
import model as htcl
from evals.metrics import collapse_warning, embedding_health, mean_pairwise_cosine
from training import (CurvePlotter, IntervalLog, NonFiniteGuard, TrackerName, _flatten_toml, _trackers,
                      allowed_values, check_out_dir, parse_config, resume_progress, save_checkpoint)

# -----------------------------------------------------------------------------
# Config: one dataclass per stage, CLI flags generated from it (training.parse_config).


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
    weight_decay: float = 0.0         # Sec. 3.1.3: Adam, none; > 0: AdamW's decoupled decay on the audio encoder and heads
    warmup_ratio: float = 0.05        # NOTE(paper): no schedule in paper or released code; warmup + cosine here
    warmup_epochs: float = 0.0        # > 0: warm up over this many epochs instead of warmup_ratio (CrossMuSim: 1)
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # cosine (after the warmup) | constant (released code: no schedule)
    max_grad_norm: float = 1.0        # NOTE(paper): no clipping in the released code; guards the from-scratch encoder
    seed: int = 3407                  # released code
    max_text_length: int = 512        # BERT's limit; lyrics are truncated (Sec. 2.1)
    max_val_songs: int = 10000        # held-out songs scored each epoch (seeded sample): R@K is N x N, and 10% of 50M songs is too many
    mixed_precision: Literal["", "no", "bf16", "fp16"] = ""  # "" = whatever `accelerate launch --mixed_precision` says; or no / bf16 / fp16
    num_workers: int = 4              # DataLoader workers per process
    log_every: int = 50               # optimizer steps between log lines
    checkpoint_every: int = 2000      # optimizer steps between mid-epoch checkpoints (an epoch at paper scale is ~62k steps); 0 = epoch ends only
    keep_checkpoints: int = 2         # newest checkpoints/step_* kept for --resume (each holds optimizer state)
    max_nonfinite_steps: int = 10     # skip a step whose loss/gradient is NaN/inf; stop after this many in a row
    resume: bool = False              # continue from the last checkpoint in out_dir
    overwrite: bool = False           # empty a non-empty out_dir first; without it (or --resume) such a folder is refused
    max_steps: int = 0                # > 0: stop after this many optimizer steps (smoke runs)
    report_to: TrackerName = "none"   # Accelerate tracker for the curves: none | tensorboard (pip install tensorboard) | wandb | ...
    # Speed switches (none changes the method but tf32; make_fast says why each default is what it is).
    compile: bool = False             # torch.compile both towers (off until measured on a GPU: see make_fast)
    text_bucket: int = 64             # with --compile: texts padded on to a multiple of this (<= max_text_length)
    frame_bucket: int = 128           # with --compile: a padded batch's frames on to a multiple of this (<= 1251)
    tf32: bool = True                 # NOTE(paper): CUDA fp32 matmuls and convolutions on TF32 tensor cores; --no-tf32 = full fp32


@dataclass
class PretrainConfig(TrainConfig):
    model: htcl.HTCLConfig = field(default_factory=htcl.HTCLConfig)
    # The CrossMuSim variant (presets/crossmusim.toml: the text-guided music similarity paper's
    # training) is this stage with another sampling: each text type its own sample, paired with
    # a random crop of model.chunk_seconds. The defaults are HTCL's (a whole song with its text X_t).
    samples: Literal["song", "crossmusim"] = "song"  # song (HTCL Sec. 2.1) | crossmusim (a crop + one text type per sample)
    text_types: tuple[Literal[data.TEXT_TYPES], ...] = data.TEXT_TYPES  # CrossMuSim: each text type is its own sample
    aspect_column: str = "aspects"    # catalog column of tag keywords (comma separated); absent = no aspect samples
    caption_column: str = "caption"   # catalog column of captions; absent = no caption samples
    max_aspects: int = 5              # CrossMuSim: up to 5 random keywords
    # Paper scale (50M songs, 16 TB of log-mels): the training songs streamed from tar shards
    # (data.py prepare --shards) instead of the memory-mapped cache; see shards.py.
    shards: str = ""                  # folder, s3://, gs:// or http(s):// URL of shards; empty = --cache / audio
    shuffle_buffer: int = 1000        # with --shards: samples shuffled together per DataLoader worker (x 320 KB each)


# -----------------------------------------------------------------------------
# The training loop, shared by both stages.


def train(cfg, model, tokenizer, loss_fn, train_set, val_set, song_set, stage):
    """Train `model` with `loss_fn(model, batch) -> (loss, parts)`; write out_dir/final.

    train_set / val_set yield what loss_fn needs; song_set yields held-out songs
    for the retrieval metrics. Returns the last validation metrics.
    """
    from accelerate.utils import set_seed

    # Setup: gradient accumulation makes up the global batch on fewer devices.
    accelerator, world, accum = make_accelerator(cfg, stage)
    set_seed(cfg.seed)
    is_main = accelerator.is_main_process

    def say(msg):  # main process only, and above the progress bar rather than through it
        if is_main:
            tqdm.write(msg)

    # Data, then the optimizer and its schedule, counted in optimizer steps.
    train_loader, val_loader, song_loader = make_loaders(cfg, tokenizer, train_set, val_set, song_set, world,
                                                         pin_memory=accelerator.device.type == "cuda")
    check_out_dir(cfg, accelerator)  # a used out_dir is refused (or emptied: --overwrite), never appended to
    start_trackers(accelerator, cfg, stage)  # the first write into out_dir
    optimizer = build_optimizer(model, cfg, accelerator.device.type)
    make_fast(cfg, model, accelerator.device)  # TF32 on CUDA; torch.compile of both towers with --compile
    model, optimizer, train_loader, val_loader, song_loader, scheduler, total_steps, steps_per_epoch = prepare_run(
        accelerator, cfg, accum, world, model, optimizer, train_loader, val_loader, song_loader)
    # The scheduler is stepped by hand once per optimizer step (not through prepare,
    # which would scale it by the number of processes); registered so save_state keeps it.
    accelerator.register_for_checkpointing(scheduler)
    net = accelerator.unwrap_model(model)
    progress = resume_progress(accelerator, cfg, say)  # where the next batch starts; loads a checkpoint on --resume
    plan, n_train = stream_plan(train_set, progress, world)  # plan: a stream of shards' data plan, for checkpoints
    start = start_health(accelerator, model, song_loader, cfg, stage, progress, say)  # collapse reference

    say(f"stage {stage}: {n_train} train / {len(val_set)} val samples, {len(song_set)} held-out songs | "
        f"{world} process(es) x {cfg.batch_per_device} x {accum} accumulation = global batch {cfg.global_batch} | "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps | {sum(p.numel() for p in net.parameters()):,} params")
    log, curves = open_logs(accelerator, cfg, say, stage, cfg.batch_per_device * world, total_steps)
    guard = NonFiniteGuard(accelerator, optimizer, cfg.max_nonfinite_steps, cfg.out_dir, say, progress["step"])
    metrics, step = {}, progress["step"]
    model.train()
    for epoch in range(progress["epoch"], cfg.epochs):
        if step >= total_steps:
            break
        skip = progress["batches"] if epoch == progress["epoch"] else 0  # resumed mid-epoch: batches already done
        loader, batches = epoch_loader(accelerator, train_loader, train_set, epoch, skip, steps_per_epoch * accum), skip
        for batch in tqdm(loader, desc=f"epoch {epoch}", initial=skip, total=len(train_loader),
                          disable=None if is_main else True, leave=False):  # None: no bar unless a terminal
            batches += 1
            # accumulate -> loss -> backward; on the last micro-batch of a global batch: clip -> step
            with accelerator.accumulate(model):
                loss, parts = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # The norm of the all-reduced gradient is the same on every process, so all
                    # of them skip a non-finite step together (no DDP hang).
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                    guard.step(grad_norm)  # optimizer.step(), unless the norm is NaN/inf: decided on the device
                    optimizer.zero_grad(set_to_none=True)
            log.add(loss, parts)
            if not accelerator.sync_gradients:  # gradients still accumulating: no optimizer step yet
                continue
            scheduler.step()
            net.clamp_logit_scales()
            step += 1  # counted as applied: guard.settle takes back the skipped ones
            if not settle_due(cfg, step, total_steps):  # between log steps the host never waits for the device
                continue
            step, moved = guard.settle(step, scheduler)
            if not moved:  # every step since the last settle was skipped
                continue
            log.step(epoch, step, scheduler.get_last_lr()[0], net, force=step % cfg.log_every == 0 or step == total_steps)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and batches < len(train_loader):
                save_checkpoint(accelerator, cfg, {"epoch": epoch, "step": step, "batches": batches, **plan})
            if step >= total_steps:
                break

        # End of an epoch: validate, log, checkpoint (where --resume picks up).
        step, _ = guard.settle(step, scheduler)
        metrics = validate(accelerator, model, loss_fn, val_loader, song_loader)
        say_epoch(say, epoch, metrics, start, stage, last=epoch == cfg.epochs - 1 or step >= total_steps)
        log.write({"stage": stage, "epoch": epoch, "step": step, "skipped_nonfinite": guard.skipped, **metrics})
        if curves:
            curves.request()
        save_checkpoint(accelerator, cfg, {"epoch": epoch + 1, "step": step, "batches": 0, **plan})

    if curves:
        curves.close()
    save_final(accelerator, cfg, net, tokenizer, stage, metrics, say)  # the artifact the next stage loads
    log.close()
    accelerator.end_training()
    return {**metrics, "skipped_nonfinite": guard.skipped}


# -----------------------------------------------------------------------------
# The loop's steps.


def make_accelerator(cfg, stage):
    """The Accelerator for this run, its number of processes, and the gradient accumulation
    steps that make batch_per_device x processes up to global_batch."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration

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
                              # non_blocking: batches go to the GPU from pinned memory (make_loaders) while it computes
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
                              log_with=trackers, project_dir=cfg.out_dir if trackers else None)
    return accelerator, world, accum


def start_trackers(accelerator, cfg, stage):
    """--report_to's trackers (they write into out_dir: after check_out_dir)."""
    if accelerator.log_with:  # e.g. tensorboard --logdir runs/demo/pretrain
        accelerator.init_trackers(f"stage{stage}", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                           for k, v in _flatten_toml(asdict(cfg))})


def make_loaders(cfg, tokenizer, train_set, val_set, song_set, world, pin_memory):
    """DataLoaders of the training samples (shuffled, seeded, whole batches only), the held-out
    samples and the held-out songs (every one of them)."""
    collate = TrainCollator(data.Collator(tokenizer, cfg.max_text_length, cfg.text_bucket if cfg.compile else 0),
                            cfg.frame_bucket if cfg.compile else 0)
    # A dataset that draws per epoch (CrossMuSim crops, shards) is told the epoch before each pass;
    # its workers must then be started afresh each epoch, so they hold the dataset with that epoch.
    # Validation keeps every sample: Accelerate's even_batches tops up the last batch from the
    # start so every process gathers the same size, and gather_for_metrics drops the extras.
    redraws = hasattr(train_set, "set_epoch")
    loader_kw = dict(collate_fn=collate, num_workers=cfg.num_workers, pin_memory=pin_memory,
                     persistent_workers=cfg.num_workers > 0 and not redraws)
    val_loader = torch.utils.data.DataLoader(val_set, cfg.batch_per_device, **loader_kw)
    song_loader = torch.utils.data.DataLoader(song_set, cfg.batch_per_device, **loader_kw)
    if isinstance(train_set, torch.utils.data.IterableDataset):  # shards: the order is the dataset's own
        return torch.utils.data.DataLoader(train_set, cfg.batch_per_device, generator=torch.Generator().manual_seed(
            cfg.seed), **loader_kw), val_loader, song_loader
    if len(train_set) < cfg.batch_per_device * world:
        raise SystemExit(f"{len(train_set)} training samples are fewer than one batch "
                         f"(--batch_per_device {cfg.batch_per_device} x {world} processes): lower "
                         f"--global_batch and --batch_per_device (global = per device x processes x accumulation)")
    # drop_last: the gathered contrastive loss needs the same batch on every process.
    # Own generator: creating a loader iterator then draws no number from the global RNG, so
    # dropout after a mid-epoch resume sees the same random stream as an uninterrupted run.
    train_loader = torch.utils.data.DataLoader(train_set, cfg.batch_per_device, shuffle=True, drop_last=True,
                                               generator=torch.Generator().manual_seed(cfg.seed), **loader_kw)
    return train_loader, val_loader, song_loader


class TrainCollator:
    """data.Collator's batches for the loop, told on the host what the device should not have to
    find out: a padding mask that marks nothing becomes None, and so does a text attention mask
    that marks every token: the towers' unmasked paths, with no attention mask, so SDPA may choose
    its flash kernel (at paper size no song is padded, and most texts fill 512 tokens).
    frame_bucket > 0 (--compile): the frames go on to a multiple of it (at most data.MAX_FRAMES),
    as padding the model masks, so the compiled audio tower sees a few lengths, not one a batch."""

    def __init__(self, collate, frame_bucket=0):
        self.collate, self.frame_bucket = collate, frame_bucket

    def __call__(self, items):  # in a DataLoader worker (or the main process): host tensors, no device sync
        batch = self.collate(items)
        for key in [k for k in batch if k.endswith("padding_mask")]:
            mel, mask = key[: -len("padding_mask")] + "mel", batch[key]
            T = mask.shape[1]
            to = min(-(-T // self.frame_bucket) * self.frame_bucket, data.MAX_FRAMES) if self.frame_bucket else T
            if to > T:
                batch[mel] = torch.nn.functional.pad(batch[mel], (0, 0, 0, to - T))  # (B, to, n_mels)
                mask = batch[key] = torch.nn.functional.pad(mask, (0, to - T), value=True)  # (B, to)
            batch[key] = None if not mask.any() else mask
        for key in [k for k in batch if k.endswith("tokens")]:
            if batch[key]["attention_mask"].all():
                batch[key] = {**batch[key], "attention_mask": None}
        return batch


def make_fast(cfg, model, device):
    """The run's speed switches (docs/PERFORMANCE.md has what each bought).

    tf32 (default on): CUDA runs their fp32 matmuls and convolutions on TF32 tensor cores, a 10-bit
    mantissa for the products, fp32 accumulation; bf16 autocast runs are barely touched (their
    matmuls are bf16 already). --no-tf32 for IEEE fp32 throughout.
    compile (default off, on every device): both towers are compiled in place (parameter names, and
    so checkpoints and artifacts, stay as they are); validation runs them eagerly. Off until a GPU
    measurement says it pays (tools/device_bench.py's compile row): a cold compile of both towers costs
    minutes, which a short run never earns back, and Inductor's dynamic shapes fail on the conv
    stem's length arithmetic (torch 2.13, reproduced on CPU), so shapes are static and the batches
    go to bucket lengths (text_bucket, frame_bucket): a compile per bucket, and padded compute.
    """
    if device.type == "cuda":
        precision = "tf32" if cfg.tf32 else "ieee"
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
            torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = precision
        else:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.compile:
        # one graph per bucket length: up to 1251 / frame_bucket + 1 audio and 512 / text_bucket text shapes
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        model.audio_encoder.compile(dynamic=False)
        if model.text_encoder is not None:
            model.text_encoder.model.compile(dynamic=False)


def open_logs(accelerator, cfg, say, stage, batch_global, total_steps):
    """The interval log (log.jsonl, trackers) and, on the main process, the curves.png plotter.
    batch_global, the negatives per contrastive loss, gives each line's chance level ln(B)."""
    log = IntervalLog(cfg.out_dir if accelerator.is_main_process else None, say, stage, batch_global, total_steps,
                      accelerator if accelerator.log_with else None)
    curves = CurvePlotter(os.path.join(cfg.out_dir, "log.jsonl"), os.path.join(cfg.out_dir, "curves.png"),
                          say) if accelerator.is_main_process else None
    return log, curves


def prepare_run(accelerator, cfg, accum, world, model, optimizer, train_loader, val_loader, song_loader):
    """The optimizer steps of an epoch and of the run, the schedule over them, and accelerator.prepare.
    A stream of shards (--shards) splits itself over ranks and workers: its loader skips prepare
    (whose sharding would split it again), and its len is per rank already.
    -> model, optimizer, the three loaders, scheduler, total steps, steps per epoch."""
    streamed = isinstance(train_loader.dataset, torch.utils.data.IterableDataset)
    steps_per_epoch = len(train_loader) // (accum * (1 if streamed else world))
    scheduler, total_steps = build_schedule(optimizer, cfg, steps_per_epoch)
    model, optimizer, val_loader, song_loader = accelerator.prepare(model, optimizer, val_loader, song_loader)
    if not streamed:
        train_loader = accelerator.prepare(train_loader)
    return model, optimizer, train_loader, val_loader, song_loader, scheduler, total_steps, steps_per_epoch


def epoch_loader(accelerator, train_loader, train_set, epoch, skip, batches):
    """The training batches of `epoch`, after the first `skip` (a mid-epoch resume). A stream of
    shards is told the epoch and where to start (shards.ShardDataset.set_epoch) and gives its first
    `batches` (whole optimizer steps: accumulation never runs over into the next epoch), moved to
    the device as a prepared loader's are."""
    if isinstance(train_set, torch.utils.data.IterableDataset):
        from accelerate.utils import send_to_device
        train_set.set_epoch(epoch, start_batch=skip)
        return (send_to_device(b, accelerator.device, non_blocking=True)
                for b in itertools.islice(train_loader, max(batches - skip, 0)))
    loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
    loader.set_epoch(epoch)  # the same shuffle as an uninterrupted run, also for the skipping loader
    if hasattr(train_set, "set_epoch"):
        train_set.set_epoch(epoch)  # the same crops and texts as an uninterrupted run
    return loader


def stream_plan(train_set, progress, world):
    """-> (what the checkpoints store of the data, the training samples of an epoch). A stream of
    shards stores its data plan (shards.ShardDataset.plan), which a mid-epoch resume must find the
    same (other streams would not give the unkilled run's batches); its len is this rank's share."""
    if not isinstance(train_set, torch.utils.data.IterableDataset):
        return {}, len(train_set)
    if progress["batches"]:
        try:
            train_set.check_plan(progress.get("data_plan", {}))
        except data.CatalogError as e:
            raise SystemExit(f"Error: --resume: {e}") from None
    return {"data_plan": train_set.plan()}, len(train_set) * world


def settle_due(cfg, step, total_steps):
    """Whether the host reads the device's counts after this optimizer step (NonFiniteGuard.settle):
    at log and checkpoint steps and the last step, where it has to wait for the device anyway."""
    return step % cfg.log_every == 0 or step >= total_steps or bool(cfg.checkpoint_every and
                                                                     step % cfg.checkpoint_every == 0)


def save_final(accelerator, cfg, net, tokenizer, stage, metrics, say):
    """out_dir/final, written by the main process once every process is done: the artifact, with
    the run's config and last validation metrics in its metadata."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = os.path.join(cfg.out_dir, "final")
        htcl.save_artifact(net, tokenizer, final, extra={"stage": stage, **asdict(cfg), **metrics})
        say(f"wrote {final}")


# -----------------------------------------------------------------------------
# Optimizer and schedule.


def lr_lambda(total_steps, warmup_steps, schedule="cosine"):
    """LambdaLR's factor at optimizer step `step`: linear warmup over warmup_steps, then a cosine
    down to 0 at total_steps (or constant, as the released code, which has no schedule)."""
    allowed = allowed_values(TrainConfig.__annotations__["lr_schedule"])  # declared once, on the field
    if schedule not in allowed:
        raise SystemExit(f"--lr_schedule must be one of {', '.join(allowed)}, not {schedule!r}")

    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def build_schedule(optimizer, cfg, steps_per_epoch):
    """The LambdaLR over the run's optimizer steps (epochs, or --max_steps if fewer), and that number.
    Warmup lasts warmup_epochs if set, else warmup_ratio of the run."""
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch) if cfg.warmup_epochs > 0 else int(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup_steps, cfg.lr_schedule)), total_steps


def build_optimizer(model, cfg, device_type):
    """Adam with up to three learning rates: the text model gets cfg.text_lr, the audio encoder
    cfg.audio_lr (0: cfg.lr), everything else (heads, fusion, temperatures) cfg.lr.
    text_lr 0 freezes the text model (no gradient is computed for it: the same weights as Adam at
    lr 0, at the cost of a forward pass only). weight_decay > 0: AdamW, decaying the audio encoder
    and the heads; the text model and the temperatures are not decayed."""
    text, audio, rest, temps = [], [], [], []
    for name, p in model.named_parameters():
        if name.startswith("text_encoder.") and cfg.text_lr == 0:
            p.requires_grad_(False)
        if p.requires_grad:
            (text if name.startswith("text_encoder.") else
             audio if name.startswith("audio_encoder.") else
             temps if name.startswith("logit_scale.") else rest).append(p)
    wd = cfg.weight_decay
    groups = [{"params": rest, "lr": cfg.lr, "weight_decay": wd},
              {"params": audio, "lr": cfg.audio_lr or cfg.lr, "weight_decay": wd},
              {"params": temps, "lr": cfg.lr, "weight_decay": 0.0},
              {"params": text, "lr": cfg.text_lr, "weight_decay": 0.0}]
    # Fused Adam on CPU and CUDA: one kernel for all tensors (bench.py, paper size on CPU: 0.19 s
    # a step against 6.7 s for the per-tensor loop); other devices keep torch's default.
    fused = True if device_type in ("cpu", "cuda") else None
    opt = torch.optim.AdamW if wd > 0 else torch.optim.Adam  # Adam's weight_decay 0 is no decay at all
    return opt([g for g in groups if g["params"]], fused=fused)  # Sec. 3.1.3: Adam, no weight decay


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
@torch.compiler.set_stance("force_eager")  # --compile: eager here, no graphs for eval mode and odd batch sizes
def say_epoch(say, epoch, metrics, start, stage, last):
    """The epoch's validation line, beside the start's collapse measures; on the last epoch, the
    collapse warning if the held-out audio embeddings look collapsed. Judged on the last epoch only:
    contrastive training often passes through a low-rank phase (the demo's stage 1: participation
    ratio 1.3-2.3 in epochs 0-6, healthy from 7 on)."""
    say(f"epoch {epoch} | " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items())
        + (f" | at the start: audio_pr {start['participation_ratio']:.4f} audio_mean_cos "
           f"{start['mean_cosine']:.4f}" if start else ""))
    warning = last and collapse_warning({"participation_ratio": metrics["audio_pr"],
                                         "mean_cosine": metrics["audio_mean_cos"]},
                                        start, "held-out audio embeddings", START_NAMES[stage])
    if warning:
        say(f"epoch {epoch}: {warning}")


def validate(accelerator, model, loss_fn, val_loader, song_loader):
    """Mean validation loss, audio->text / text->audio R@1, R@10 (chance: k / N), and the collapse
    measures: the audio embeddings' participation ratio and mean pairwise cosine, the text's mean cosine."""
    from evals.metrics import recall_at_k
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
    # collapse measures (evals.metrics.collapse_warning reads the audio pair)
    health = embedding_health(audio_emb)
    metrics["audio_pr"], metrics["audio_mean_cos"] = health["participation_ratio"], health["mean_cosine"]
    metrics["text_mean_cos"] = mean_pairwise_cosine(text_emb)
    model.train()
    return metrics


START_NAMES = {1: "untrained encoder", 2: "stage-1 encoder"}  # what each stage starts from


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def start_health(accelerator, model, song_loader, cfg, stage, progress, say):
    """embedding_health of the held-out songs' audio embeddings at the stage's starting weights
    (stage 1: the seeded, untrained encoder; stage 2: stage 1's): the reference each validation's
    collapse measures are printed beside. One pass over the held-out songs, logged in log.jsonl
    and read back from there on --resume (the checkpoint holds trained weights, not the start)."""
    path = os.path.join(cfg.out_dir, "log.jsonl")
    if progress["step"] and os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if '"start_audio_pr"' in line]
        return {"participation_ratio": rows[-1]["start_audio_pr"], "mean_cosine": rows[-1]["start_audio_mean_cos"]} \
            if rows else None
    if progress["step"]:
        return None
    # A loader iterator draws its base seed from the global RNG: put it back, so that training sees
    # the random stream it saw before this pass existed (dropout, and the numbers in the README).
    rng = torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    health = embedding_health(embed_songs(accelerator, model, song_loader)[0])
    torch.random.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    model.train()
    say(f"held-out audio embeddings at the start ({START_NAMES[stage]}): participation ratio "
        f"{health['participation_ratio']:.2f}, mean pairwise cosine {health['mean_cosine']:.3f}")
    if accelerator.is_main_process:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, "step": 0, "start_audio_pr": health["participation_ratio"],
                                "start_audio_mean_cos": health["mean_cosine"]}) + "\n")
    return health


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
    streamed = getattr(cfg, "shards", "")  # stage 1 only: stage 2 (finetune.py) keeps the random-access cache
    if cache is None and not streamed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Straight from audio, a song that fails to decode is dropped from its batch; the gathered
        # loss needs equal batches on every process, and the cache drops such songs up front.
        raise SystemExit(f"several processes need the log-mel cache: python data.py prepare "
                         f"--catalog {cfg.catalog} --cache DIR, then --cache DIR")
    train_rows = data.split_rows(catalog, "train", seed=cfg.seed)
    val_rows = data.split_rows(catalog, "val", seed=cfg.seed)
    for name, rows in (("train", train_rows), ("val", val_rows)):  # before training, not in validation's torch.cat
        if not rows:
            values = sorted({catalog.label(r, "split") for r in range(len(catalog))}) if "split" in catalog.columns \
                else []
            raise SystemExit(f"{catalog.path}: no '{name}' songs (split column values: {', '.join(values) or 'none'}"
                             f"; {len(catalog)} songs); training needs train and val rows: mark some '{name}', or "
                             f"drop the split column for the seeded 90/10 split")
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
    if cfg.shards:  # held-out songs: from --cache if given, else decoded here (at most max_val_songs)
        train_set, val_set = shard_train_set(cfg, catalog, train_rows), song_set
    elif cfg.samples == "song":
        train_set, val_set = data.SongDataset(catalog, train_rows, cache, on_error="skip"), song_set
    else:
        train_set, val_set = crossmusim_sets(cfg, catalog, cache, train_rows, val_rows)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.text_model)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = htcl.HTCL(cfg.model)
    model.freeze_unused(stage=1)
    train(cfg, model, tokenizer, stage1_loss, train_set, val_set, song_set, stage=1)


def shard_train_set(cfg, catalog, train_rows):
    """The training songs streamed from --shards: this process's streams (one per DataLoader worker)
    of the train rows, reshuffled each epoch, exact to the batch on a mid-epoch resume (shards.py)."""
    import shards
    from accelerate import PartialState
    if cfg.samples != "song":
        raise SystemExit("--shards streams whole songs with their text X_t (--samples song); the CrossMuSim "
                         "variant draws crops at random: give it --cache")
    state = PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    try:
        return shards.ShardDataset(cfg.shards, cfg.batch_per_device, state.process_index, state.num_processes,
                                   cfg.num_workers, cfg.seed, cfg.shuffle_buffer, catalog=catalog, rows=train_rows)
    except data.CatalogError as e:
        raise SystemExit(f"Error: --shards: {e}") from None


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
