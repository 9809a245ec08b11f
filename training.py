"""The plumbing both training stages share, kept out of the training loop so the loop reads as
the steps of one iteration (pretrain.train; finetune.py runs the same loop):

    dataclass -> CLI and presets   parse_config (every field a flag, `--preset FILE.toml` tables)
    trackers                       --report_to -> Accelerate's log_with
    logging                        IntervalLog (one line per interval + log.jsonl), CurvePlotter / plot_curves
    non-finite steps               NonFiniteGuard (skipped on the device; the host reads the counts at log steps)
    checkpoints                    save_checkpoint (atomic, pruned), resume_progress (--resume)
    out_dir                        check_out_dir (a used folder: refused, or --overwrite empties it)

None of it is part of the method (HTCL Sec. 2.1 / 2.2): it is how a run is configured, watched
and continued. It runs through the stage scripts, e.g.

    python pretrain.py -h                                 # the flags parse_config generates
    python pretrain.py --preset sample_data/preset.toml   # a preset, log.jsonl + curves.png, checkpoints
"""
import argparse
import dataclasses
import glob
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import tomllib
import typing

import torch

import model as htcl

# -----------------------------------------------------------------------------
# Config: the stage's dataclass -> CLI flags, overridden by a preset's table.


def _flat_fields(cls, prefix=""):
    """Yield (dotted name, default, allowed values or None) for a dataclass, descending into nested
    dataclass fields. The allowed values are the field's own declaration, typing.Literal[...] (or
    tuple[Literal[...], ...] for a list of them): the one place an enum-like setting is declared."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _flat_fields(type(default), prefix + f.name + ".")
        elif f.name != "text_model_config":  # filled in by the model, not a knob
            yield prefix + f.name, default, allowed_values(hints.get(f.name))


def allowed_values(hint):
    """Literal["a", "b"] or tuple[Literal["a", "b"], ...] -> ("a", "b"); anything else -> None."""
    if typing.get_origin(hint) is tuple and typing.get_args(hint):
        hint = typing.get_args(hint)[0]
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None


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
PATH_FIELDS = ("catalog", "cache", "shards", "out_dir", "init_from", "pairs", "model.text_model")


def _preset_path(preset, name, value):
    if name not in PATH_FIELDS or not isinstance(value, str) or not value or os.path.isabs(value) or "://" in value:
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


SECTIONS = ("pretrain", "finetune")  # the tables a preset may hold: one per stage's dataclass
# The range of every number a stage reads: > 0 (counts, sizes, learning rates, lengths), unless
# listed here. A list field's elements are checked one by one.
NON_NEGATIVE = ("lr", "text_lr", "audio_lr", "warmup_epochs", "max_grad_norm", "seed", "num_workers",
                "checkpoint_every", "max_steps", "weight_aa", "weight_af", "weight_at")  # 0 = off (lr 0: frozen)
FRACTIONS = ("warmup_ratio", "val_pairs_fraction", "model.audio.dropout")  # 0 <= x < 1
ANY_NUMBER = ("model.logit_scale_init",)  # a log logit scale: any finite number
NOT_FINITE_OK = ("model.logit_scale_max",)  # inf: no clamp (presets/released.toml)


def value_error(name, v):
    """What is wrong with number v for field `name`, or None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if not math.isfinite(v):
        return None if name in NOT_FINITE_OK and v > 0 else f"expected a finite number, got {v!r}"
    if name in ANY_NUMBER:
        return None
    if name in FRACTIONS:
        return None if 0 <= v < 1 else f"expected a fraction, 0 <= x < 1, got {v!r}"
    if name in NON_NEGATIVE:
        return None if v >= 0 else f"expected a number >= 0, got {v!r}"
    return None if v > 0 else f"expected a positive number, got {v!r}"


def parse_config(cls, section, argv=None, needs=None):
    """Build `cls` from its defaults, then `--preset FILE.toml` ([section] table), then CLI flags.
    With no argument at all and `needs` given (what the stage cannot run without), print
    usage_hint instead and exit.

    Every field (nested ones as --model.audio.layers) becomes a flag with its
    default in -h; unknown flags, unknown preset keys and unknown preset tables are errors, as
    are values of the wrong type or outside a Literal field's choices, each naming the file,
    the table and the key. Relative paths in a preset are read from its folder (PATH_FIELDS).
    """
    if needs and not (sys.argv[1:] if argv is None else argv):
        exit_with_usage(os.path.basename(sys.modules[cls.__module__].__file__), needs)
    flat = {name: (default, choices) for name, default, choices in _flat_fields(cls)}
    comments = {**_field_comments(htcl.AudioConfig), **_field_comments(htcl.HTCLConfig), **_field_comments(cls)}
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"TOML file whose [{section}] table overrides the defaults")
    for name, (default, choices) in flat.items():
        short = name.split(".")[-1]
        why = comments.get(short, "").replace("%", "%%")
        if isinstance(default, bool):
            p.add_argument("--" + name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{why} (default: {default})")
        elif isinstance(default, tuple):
            p.add_argument("--" + name, nargs="+", type=type(default[0]), default=None, metavar=short.upper(),
                           choices=choices, help=f"{why} (default: {' '.join(map(str, default))})")
        else:
            p.add_argument("--" + name, type=type(default), default=None, metavar=short.upper(), choices=choices,
                           help=f"{why} (default: {default!r})")
    args = vars(p.parse_args(argv))

    values = {}
    path = args.pop("preset")
    if path:
        values = _read_preset(path, section, flat)
    for name, v in args.items():
        if v is not None:
            wrong = [e for e in map(lambda x: value_error(name, x), v if isinstance(v, list) else [v]) if e]
            if wrong:
                p.error(f"argument --{name}: {wrong[0]}")
            values[name] = tuple(v) if isinstance(v, list) else v

    cfg = cls()
    for name, v in values.items():
        obj, *parts, last = [cfg] + name.split(".")
        for part in parts:
            obj = getattr(obj, part)
        setattr(obj, last, v)
    check_trackers(cfg.report_to)  # a tracker whose package is missing: now, not after the data is loaded
    return cfg


def _read_preset(path, section, flat):
    """A preset's [section] table -> {dotted field: value}, each value checked against its field:
    a list for a list field, the field's type (an int is taken for a float), a Literal's choices.
    An error names the file, the table, the key and what was expected."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SystemExit(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise SystemExit(f"--preset {path}: {e.strerror}") from None
    for key, table in doc.items():
        if key not in SECTIONS or not isinstance(table, dict):
            what = f"table [{key}]" if isinstance(table, dict) else f"key {key!r} outside any table"
            raise SystemExit(f"{path}: unknown {what}; a preset holds the tables {', '.join(f'[{s}]' for s in SECTIONS)}"
                             f" (and their sub-tables, e.g. [{section}.model])")
    values = {}
    for name, v in _flatten_toml(doc.get(section, {})):
        table, _, key = f"{section}.{name}".rpartition(".")
        where = f"{path}: [{table}] {key}"
        if name not in flat:
            raise SystemExit(f"{path}: [{section}] has unknown key {name!r}" if "." not in name else
                             f"{where}: unknown key (table [{table}])")
        default, choices = flat[name]
        if isinstance(default, tuple):
            if not isinstance(v, list) or not v:
                raise SystemExit(f"{where}: expected a non-empty list of {type(default[0]).__name__}, got {v!r}")
            v = tuple(_preset_value(where, x, default[0], choices, name) for x in v)
        else:
            v = _preset_path(path, name, _preset_value(where, v, default, choices, name))
        values[name] = v
    return values


def _preset_value(where, v, default, choices, name):
    if isinstance(default, float) and type(v) is int:
        v = float(v)
    if type(v) is not type(default):
        raise SystemExit(f"{where}: expected {type(default).__name__}, got {type(v).__name__} {v!r}")
    if choices is not None and v not in choices:
        raise SystemExit(f"{where}: {v!r} is not one of {', '.join(map(repr, choices))}")
    if value_error(name, v):
        raise SystemExit(f"{where}: {value_error(name, v)}")
    return v


# -----------------------------------------------------------------------------
# Logging: trackers, one line per interval, curves.png.


# Accelerate's trackers that --report_to accepts (TrainConfig.report_to's Literal), with the
# package each one needs (optional extras, not in requirements.txt).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}

TrackerName = typing.Literal[("none", *TRACKER_PACKAGES)]  # TrainConfig.report_to: checked at parse time


def check_trackers(report_to):
    """A --report_to whose package is not installed stops the run here, saying how to install it."""
    package = TRACKER_PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise SystemExit(f"--report_to {report_to} needs the {package} package: pip install {package} "
                         f"(or --report_to none; curves.png is drawn either way)")


def _trackers(report_to):
    """--report_to -> Accelerate's log_with (None for none); each tracker is an optional extra."""
    if report_to in ("", "none"):
        return None
    check_trackers(report_to)
    return report_to


class IntervalLog:
    """One line per log interval: step, loss (parts), chance level ln(B), lr, temperatures,
    samples/s; also appended to out_dir/log.jsonl, and sent to the Accelerate trackers
    (--report_to). Non-finite losses are left out of the means. The sums stay on the device
    until a line is written, so that the host does not wait for the device at every step."""

    def __init__(self, out_dir, say, stage, batch_global, total_steps, accelerator=None):
        self.say, self.stage, self.batch_global, self.total_steps = say, stage, batch_global, total_steps
        self.accelerator = accelerator
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, "log.jsonl"), "a") if out_dir else None
        self.reset()

    def reset(self):
        self.t0, self.sums, self.keys = time.time(), None, ()

    def add(self, loss, parts):
        """Adds to the interval's sums on the device: (loss, *parts, number of finite losses)."""
        vals = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])  # (1 + P,)
        finite = torch.isfinite(vals[0])
        vals = torch.cat([torch.where(finite, vals, 0.0), finite.float()[None]])  # (2 + P,)
        self.sums, self.keys = vals if self.sums is None else self.sums + vals, tuple(parts)

    def step(self, epoch, step, lr, net, force):
        if not force or self.sums is None:
            return
        loss, *sums, n = self.sums.tolist()  # the interval's one transfer to the host
        if not n:
            return
        parts = {k: v / n for k, v in zip(self.keys, sums)}
        rec = {"stage": self.stage, "epoch": epoch, "step": step, "loss": loss / n,
               "ln_B": math.log(self.batch_global), "lr": lr,
               "samples_per_s": n * self.batch_global / (time.time() - self.t0),
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


class NonFiniteGuard:
    """Skips an optimizer step whose gradient norm is NaN/inf, and stops the run after
    max_in_a_row of them in a row, without the host waiting for the device at every step.

    step(grad_norm) hands the flag to torch's fused Adam as its found_inf (the mechanism GradScaler
    uses): the fused kernel then changes no weight, no moment and no step count, all on the device.
    An optimizer without it (not fused, or fp16, whose GradScaler owns found_inf) is checked on the
    host instead, one sync a step. The counts stay on the device until settle(), which the loop
    calls where it syncs anyway (log and checkpoint steps, an epoch's end): one transfer, then the
    skipped steps are taken back from the step count and the lr schedule, said, and counted.
    Two consequences of waiting: max_in_a_row in a row stop the run at the next settle (up to
    log_every steps late; the skipped steps changed nothing meanwhile), and between a skipped step
    and that settle the schedule runs one position ahead per skipped step.
    """

    def __init__(self, accelerator, optimizer, max_in_a_row, out_dir, say, step=0):
        self.optimizer, self.max_in_a_row, self.out_dir, self.say = optimizer, max_in_a_row, out_dir, say
        self.inner = getattr(optimizer, "optimizer", optimizer)  # torch's, under Accelerate's wrapper
        self.on_device = accelerator.scaler is None and all(g.get("fused") for g in self.inner.param_groups)
        # skipped since the last settle, in a row now, the longest run since the last settle
        self.counts = torch.zeros(3, device=accelerator.device)
        self.skipped, self.settled = 0, step  # in all, and the step count, as of the last settle

    def step(self, grad_norm):
        bad = (~torch.isfinite(grad_norm)).float().reshape(())
        if self.on_device:
            self.inner.found_inf = bad
            try:
                self.optimizer.step()
            finally:
                del self.inner.found_inf
        elif not bad.item():
            self.optimizer.step()
        run = (self.counts[1] + 1) * bad
        self.counts = torch.stack([self.counts[0] + bad, run, torch.maximum(self.counts[2], run)])

    def settle(self, step, scheduler):
        """-> (the number of steps applied, whether it grew since the last settle)."""
        bad, run, longest = (int(v) for v in self.counts.tolist())  # the one transfer to the host
        self.counts = torch.stack([self.counts[0] * 0, self.counts[1], self.counts[1]])
        if bad:
            step -= bad
            self.skipped += bad
            scheduler.last_epoch -= bad + 1  # back to the applied steps: step() adds one and sets the lr
            scheduler.step()
            self.say(f"step {step + 1}: {bad} update(s) with a non-finite loss/gradient skipped since the last "
                     f"log ({run} in a row now, {self.skipped} in all)")
        if longest >= self.max_in_a_row:
            raise SystemExit(f"{longest} non-finite steps in a row: stopping. The last checkpoint "
                             f"in {self.out_dir}/checkpoints is intact; try a lower --lr, "
                             f"--mixed_precision no, or check the data.")
        grew, self.settled = step > self.settled, step
        return step, grew


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


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, the newest kept, read back by --resume.


def _checkpoints(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*")))  # zero-padded: sorted = by step


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


def check_out_dir(cfg, accelerator=None):
    """A run never appends to another run's folder (its log.jsonl, curves and checkpoints would mix):
    a non-empty out_dir is refused with one line, unless --resume (continue the run in it) or
    --overwrite (the main process empties it first). Every process looks before any empties or
    writes (accelerator: the barriers that make it so)."""
    used = os.path.isdir(cfg.out_dir) and bool(os.listdir(cfg.out_dir))
    have = ", ".join(sorted(os.listdir(cfg.out_dir))[:4]) if used else ""
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if cfg.resume and cfg.overwrite:
        raise SystemExit("--resume continues the run in out_dir and --overwrite empties it: give one of them")
    if not used or cfg.resume:
        return
    if not cfg.overwrite:
        raise SystemExit(f"out_dir {cfg.out_dir} is not empty ({have}): --resume continues the run in it, "
                         f"--overwrite empties it first, or give another --out_dir")
    if accelerator is None or accelerator.is_main_process:
        for name in os.listdir(cfg.out_dir):
            path = os.path.join(cfg.out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        print(f"--overwrite: emptied {cfg.out_dir}")
    if accelerator is not None:
        accelerator.wait_for_everyone()


def resume_progress(accelerator, cfg, say):
    """Where the next batch starts: {epoch, optimizer steps so far, micro-batches already consumed in
    that epoch} (batches is non-zero after a mid-epoch checkpoint). With --resume and a checkpoint in
    out_dir, the newest one is loaded first (model, optimizer, scheduler, RNG states), so the run
    continues as if it had never stopped; otherwise training starts at the beginning."""
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
    return progress
