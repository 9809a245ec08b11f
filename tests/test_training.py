"""Tests of training.py, shared by both stages: presets (released, CrossMuSim, small) parse into
the stage configs, command-line paths stay relative to the working directory, no-argument runs
print the demo command, curves are drawn off the training thread, and trackers fail cleanly.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_training.py
"""
import importlib.util
import math
import os
import sys

import pytest

from tests.helpers import ROOT
import json
from tests.own_songs import stage1_argv, write_world
import pretrain


def test_released_preset_parses_into_both_stage_configs():
    import finetune
    import pretrain
    import training
    path = os.path.join(ROOT, "presets", "released.toml")
    pre = training.parse_config(pretrain.PretrainConfig, "pretrain", ["--preset", path])
    fine = training.parse_config(finetune.FinetuneConfig, "finetune", ["--preset", path])
    assert (pre.lr, pre.text_lr, pre.batch_per_device, pre.lr_schedule) == (1e-4, 1e-5, 32, "constant")
    assert pre.model.logit_scale_max == math.inf and pre.max_grad_norm == 0
    assert (fine.lr, fine.audio_lr, fine.text_lr, fine.batch_per_device) == (1e-4, 1e-5, 1e-5, 32)
    assert fine.init_heads == "fresh" and fine.use_trigger_text and fine.epochs == 20
    # the constant schedule keeps the lr; the default cosine one decays it
    assert pretrain.lr_lambda(100, 0, "constant")(99) == 1.0 > pretrain.lr_lambda(100, 0)(99)


def test_crossmusim_preset_parses_with_the_papers_settings():
    import pretrain
    import training
    path = os.path.join(ROOT, "presets", "crossmusim.toml")
    cfg = training.parse_config(pretrain.PretrainConfig, "pretrain", ["--preset", path])
    assert cfg.samples == "crossmusim" and tuple(cfg.text_types) == ("aspects", "caption", "lyrics")
    assert (cfg.lr, cfg.text_lr, cfg.global_batch, cfg.epochs, cfg.warmup_epochs) == (1e-4, 1e-4, 64, 41, 1.0)
    m = cfg.model
    assert not m.learn_temperature and math.isclose(1 / math.exp(m.logit_scale_init), 0.07)
    assert (m.audio_pooling, m.text_pooling, m.embed_mode, m.chunk_seconds) == ("cls", "mean", "chunked", 10.0)
    assert cfg.out_dir == os.path.join(ROOT, "runs", "crossmusim")  # relative to the preset's folder


def test_paths_on_the_command_line_stay_relative_to_the_working_directory(tmp_path):
    import pretrain
    import training
    preset = tmp_path / "p.toml"
    preset.write_text('[pretrain]\ncatalog = "c.csv"\ncache = "/abs/cache"\n[pretrain.model]\n'
                      'text_model = "bert-base-uncased"\n')
    cfg = training.parse_config(pretrain.PretrainConfig, "pretrain", ["--preset", str(preset), "--out_dir", "o"])
    assert cfg.catalog == str(tmp_path / "c.csv") and cfg.cache == "/abs/cache" and cfg.out_dir == "o"
    assert cfg.model.text_model == "bert-base-uncased"  # no such folder beside the preset: a hub name


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_no_arguments_print_the_demo_command_without_a_traceback(script, capsys, monkeypatch):
    stage = importlib.import_module(script)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.raises(SystemExit) as e:
        stage.main([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"accelerate launch {script}.py --preset sample_data/preset.toml" in err and len(err.splitlines()) <= 5
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` sets
    with pytest.raises(SystemExit) as e:
        stage.main([])
    assert e.value.code == 0  # accelerate would print its own traceback over any other status


def test_curve_plotter_draws_every_row_once_training_ends_and_never_raises(tmp_path, monkeypatch):
    import threading

    import training
    log = tmp_path / "log.jsonl"
    seen, gate = [], threading.Event()

    def slow_plot(log_path, png_path):  # the first draw waits until rows were added behind it
        gate.wait(10)
        seen.append(len(open(log_path).read().split("\n")[:-1]))

    monkeypatch.setattr(training, "plot_curves", slow_plot)
    plotter = training.CurvePlotter(str(log), str(tmp_path / "c.png"))
    log.write_text('{"step": 1}\n')
    plotter.request()
    for step in (2, 3):  # two requests while the first draw runs: folded into one more draw
        with open(log, "a") as f:
            f.write(f'{{"step": {step}}}\n')
        plotter.request()
    gate.set()
    plotter.close()
    assert seen[-1] == 3 and len(seen) == 2, seen
    said = []
    monkeypatch.setattr(training, "plot_curves", lambda *a: 1 / 0)
    broken = training.CurvePlotter(str(log), str(tmp_path / "c.png"), say=said.append)
    for _ in range(3):
        broken.request()
        broken.close()
    assert len(said) == 1 and "ZeroDivisionError" in said[0]


def test_small_catalog_preset_is_valid_and_reads_paths_from_its_folder():
    import finetune
    import pretrain
    import training
    preset = os.path.join(ROOT, "presets", "small.toml")
    cfg = training.parse_config(pretrain.PretrainConfig, "pretrain", ["--preset", preset])
    assert cfg.catalog == os.path.join(ROOT, "my_songs", "catalog.csv") and cfg.global_batch == 16
    assert cfg.model.text_model == "../models/bert-base-multilingual-uncased"  # no such folder here: kept as given
    cfg = training.parse_config(finetune.FinetuneConfig, "finetune", ["--preset", preset])
    assert cfg.init_from == os.path.join(ROOT, "runs", "mine", "pretrain", "final")


def test_report_to_tensorboard_without_the_package_says_how_to_install_it(monkeypatch):
    import training
    assert training._trackers("none") is None
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        training._trackers("tensorboard")


def _rows(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_used_out_dir_is_refused_in_one_line_or_emptied_with_overwrite_never_appended_to(tmp_path):
    catalog, cache = write_world(str(tmp_path / "world"), n=10)
    out = tmp_path / "run"
    argv = stage1_argv(catalog, cache, out, "--max_steps", "1")
    pretrain.main(argv)
    first = _rows(out)
    assert sum("start_audio_pr" in r for r in first) == 1
    with pytest.raises(SystemExit) as e:
        pretrain.main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg and f"out_dir {out} is not empty" in msg and "--resume" in msg and "--overwrite" in msg
    assert _rows(out) == first  # nothing appended
    (out / "stray.txt").write_text("x")
    pretrain.main(argv + ["--overwrite"])
    again = _rows(out)
    assert sum("start_audio_pr" in r for r in again) == 1 and len(again) == len(first)  # one run's rows
    assert not (out / "stray.txt").exists() and (out / "final" / "config.json").exists()
    with pytest.raises(SystemExit, match="give one of them"):
        pretrain.main(argv + ["--overwrite", "--resume"])
    # an empty folder (as mkdtemp makes) is no used run
    (tmp_path / "empty").mkdir()
    pretrain.main(stage1_argv(catalog, cache, tmp_path / "empty", "--max_steps", "1"))
