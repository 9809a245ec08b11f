"""Tests of training.py, shared by both stages: presets (released, CrossMuSim, small) parse into
the stage configs, command-line paths stay relative to the working directory, no-argument runs
print the demo command, curves are drawn off the training thread, and trackers fail cleanly; a
preset or flag error names the file, table and key, and enum-like settings are declared once.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_training.py
"""
import importlib.util
import json
import math
import os
import sys

import pytest

import finetune
import pretrain
import training

from tests.helpers import ROOT
from tests.own_songs import stage1_argv, write_world


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


def _parse(tmp_path, text, cls=pretrain.PretrainConfig, section="pretrain"):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return training.parse_config(cls, section, ["--preset", str(path)])


@pytest.mark.parametrize("text, message", [
    ("[pretrain]\nepochs = 3\n[pretrian]\nlr = 1.0\n", r"p.toml: unknown table \[pretrian\]; a preset holds the "
                                                       r"tables \[pretrain\], \[finetune\]"),
    ("epochs = 3\n", r"p.toml: unknown key 'epochs' outside any table"),
    ("[pretrain]\nepochs = \n", r"p.toml: not valid TOML: "),
    ("[pretrain.model]\nproj_dims = 100\n", r"p.toml: \[pretrain.model\] proj_dims: expected a non-empty list of "
                                            r"int, got 100"),
    ("[pretrain]\ntext_types = \"lyrics\"\n", r"p.toml: \[pretrain\] text_types: expected a non-empty list of str"),
    ("[pretrain.model]\nproj_dims = [100, 50.5]\n", r"\[pretrain.model\] proj_dims: expected int, got float 50.5"),
    ("[pretrain]\nepochs = \"3\"\n", r"p.toml: \[pretrain\] epochs: expected int, got str '3'"),
    ("[pretrain]\nresume = 1\n", r"p.toml: \[pretrain\] resume: expected bool, got int 1"),
    ("[pretrain.model.audio]\nlayers = 2.0\n", r"p.toml: \[pretrain.model.audio\] layers: expected int, got float"),
    ("[pretrain]\nlr_schedule = \"cosin\"\n", r"p.toml: \[pretrain\] lr_schedule: 'cosin' is not one of 'cosine', "
                                              r"'constant'"),
    ("[pretrain]\ntext_types = [\"lyrics\", \"chorus\"]\n", r"\[pretrain\] text_types: 'chorus' is not one of"),
    ("[pretrain.model]\nwidth = 3\n", r"p.toml: \[pretrain.model\] width: unknown key"),
    ("[pretrain]\nepoch = 3\n", r"p.toml: \[pretrain\] has unknown key 'epoch'")])
def test_preset_errors_name_the_file_table_key_and_expected_type(tmp_path, text, message):
    """Bugs checked: a scalar for a list field was a TypeError traceback (or a string split into
    letters), malformed TOML did not name the file, a wrong scalar type named neither file nor
    table, and a misspelled [pretrian] table was dropped silently."""
    with pytest.raises(SystemExit, match=message):
        _parse(tmp_path, text)


def test_a_valid_preset_still_parses_with_ints_taken_for_floats(tmp_path):
    cfg = _parse(tmp_path, "[pretrain]\nlr = 1\ntext_types = [\"lyrics\"]\n[pretrain.model]\nproj_dims = [8, 4]\n"
                           "[finetune]\ninit_heads = \"artifact\"\n")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.text_types == ("lyrics",)
    assert cfg.model.proj_dims == (8, 4)
    fine = _parse(tmp_path, "[finetune]\ninit_heads = \"artifact\"\n", finetune.FinetuneConfig, "finetune")
    assert fine.init_heads == "artifact"
    with pytest.raises(SystemExit, match=r"\[finetune\] init_heads: 'fresh_heads' is not one of 'fresh', 'artifact'"):
        _parse(tmp_path, "[finetune]\ninit_heads = \"fresh_heads\"\n", finetune.FinetuneConfig, "finetune")


@pytest.mark.parametrize("cls, argv, choices", [
    (finetune.FinetuneConfig, ["--init_heads", "all"], "'fresh', 'artifact'"),
    (pretrain.PretrainConfig, ["--lr_schedule", "linear"], "'cosine', 'constant'"),
    (pretrain.PretrainConfig, ["--text_types", "lyrics", "chorus"], "'aspects', 'caption', 'lyrics'"),
    (pretrain.PretrainConfig, ["--report_to", "wandbb"], "'none', 'tensorboard', 'wandb'")])
def test_enum_settings_are_checked_at_parse_time(cls, argv, choices, capsys):
    """Bug checked: a typo in --report_to was accelerate's traceback once training started."""
    with pytest.raises(SystemExit) as e:
        training.parse_config(cls, "x", argv)
    assert e.value.code == 2 and f"invalid choice: '{argv[-1]}' (choose from {choices}" in capsys.readouterr().err


def test_enum_choices_are_declared_once_on_the_fields():
    fields = {name: choices for name, _, choices in training._flat_fields(finetune.FinetuneConfig)}
    assert fields["init_heads"] == ("fresh", "artifact") and fields["lr_schedule"] == ("cosine", "constant")
    assert fields["report_to"] == ("none", *training.TRACKER_PACKAGES)
    pre = {name: choices for name, _, choices in training._flat_fields(pretrain.PretrainConfig)}
    import data
    assert pre["text_types"] == data.TEXT_TYPES


def test_report_to_a_tracker_that_is_not_installed_stops_at_parse_time(monkeypatch):
    """Bug checked: --report_to wandb without wandb only warned, and trained without curves."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"--report_to wandb needs the wandb package: pip install wandb"):
        training.parse_config(pretrain.PretrainConfig, "pretrain", ["--report_to", "wandb"])
    assert training.parse_config(pretrain.PretrainConfig, "pretrain", ["--report_to", "none"]).report_to == "none"


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "-1"], "argument --epochs: expected a positive number, got -1"),
    (["--global_batch", "0"], "argument --global_batch: expected a positive number, got 0"),
    (["--lr", "-0.001"], "argument --lr: expected a number >= 0, got -0.001"),
    (["--lr", "nan"], "argument --lr: expected a finite number, got nan"),
    (["--warmup_ratio", "1.5"], "argument --warmup_ratio: expected a fraction, 0 <= x < 1, got 1.5"),
    (["--num_workers", "-1"], "argument --num_workers: expected a number >= 0, got -1"),
    (["--model.proj_dims", "100", "0"], "argument --model.proj_dims: expected a positive number, got 0"),
    (["--model.audio.dropout", "1.0"], "argument --model.audio.dropout: expected a fraction"),
    (["--model.chunk_seconds", "0"], "argument --model.chunk_seconds: expected a positive number, got 0.0")])
def test_numbers_of_the_wrong_sign_or_size_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        training.parse_config(pretrain.PretrainConfig, "pretrain", argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_preset_numbers_are_checked_as_flags_are(tmp_path):
    with pytest.raises(SystemExit, match=r"p.toml: \[pretrain\] keep_checkpoints: expected a positive number, got 0"):
        _parse(tmp_path, "[pretrain]\nkeep_checkpoints = 0\n")
    with pytest.raises(SystemExit, match=r"p.toml: \[pretrain.model\] fusion_dims: expected a positive number, got -4"):
        _parse(tmp_path, "[pretrain.model]\nfusion_dims = [8, -4]\n")
    cfg = _parse(tmp_path, "[pretrain]\nmax_grad_norm = 0\nmax_steps = 0\n[pretrain.model]\nlogit_scale_max = inf\n"
                           "logit_scale_init = -1.0\n")
    assert cfg.max_grad_norm == 0 and cfg.model.logit_scale_max == float("inf") and cfg.model.logit_scale_init == -1
