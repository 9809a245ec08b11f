"""Tests of the commands the README gives for one's own songs: `accelerate launch` with the shipped
presets/accelerate.yaml prints no defaults warning.

    python -m pytest -q tests/test_scripts.py
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = "were not passed to `accelerate launch`"


def _launch(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *args, "pretrain.py", "-h"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout + p.stderr


def test_accelerate_launch_with_the_shipped_config_prints_no_defaults_warning():
    assert WARNING in _launch()  # the launcher's warning, as a bare `accelerate launch` prints it
    out = _launch("--config_file", "presets/accelerate.yaml")
    assert WARNING not in out and "usage: pretrain.py" in out
    assert WARNING not in _launch("--config_file", "presets/accelerate.yaml", "--mixed_precision", "bf16")


def test_the_own_songs_section_launches_with_the_shipped_config():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Train on your own songs"):text.index("\n## ", text.index("## Train on your own songs") + 3)]
    launches = re.findall(r"accelerate launch[^\n]*", section)
    assert launches and all("--config_file presets/accelerate.yaml" in line for line in launches), launches


@pytest.fixture
def sandbox(tmp_path):
    """tmp/sample_data/{table2,crossmusim}.sh, earlier runs' outputs, and a recording `python`."""
    os.makedirs(tmp_path / "sample_data")
    for name in ("table2.sh", "crossmusim.sh"):
        shutil.copy(os.path.join(ROOT, "sample_data", name), tmp_path / "sample_data" / name)
    os.makedirs(tmp_path / "bin")
    for tool in ("python", "accelerate"):
        (tmp_path / "bin" / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/called"\nexit 1\n')
        os.chmod(tmp_path / "bin" / tool, 0o755)
    os.makedirs(tmp_path / "runs" / "table2" / "s3407")
    (tmp_path / "runs" / "table2" / "times.txt").write_text("stage 1: 100 s\n")
    os.makedirs(tmp_path / "runs" / "crossmusim" / "train" / "final")
    (tmp_path / "runs" / "crossmusim" / "train" / "final" / "config.json").write_text("{}")
    return tmp_path


def _run(sandbox, script, *args, **env):
    environ = {**os.environ, "PATH": f"{sandbox / 'bin'}:{os.environ['PATH']}", **env}
    for k in ("SEEDS", "JOBS", "STAGE2_EPOCHS"):
        if k not in env:
            environ.pop(k, None)
    return subprocess.run(["bash", str(sandbox / "sample_data" / script), *args], capture_output=True, text=True,
                          env=environ, timeout=60)


def _untouched(sandbox):
    assert not (sandbox / "called").exists(), (sandbox / "called").read_text()
    assert (sandbox / "runs" / "table2" / "times.txt").read_text() == "stage 1: 100 s\n"
    assert (sandbox / "runs" / "table2" / "s3407").is_dir()
    assert (sandbox / "runs" / "crossmusim" / "train" / "final" / "config.json").exists()


@pytest.mark.parametrize("script", ["table2.sh", "crossmusim.sh"])
def test_help_prints_usage_and_touches_nothing(sandbox, script):
    """Bug checked: --help was ignored: crossmusim.sh deleted runs/crossmusim/train/ and
    table2.sh emptied times.txt and started the full run."""
    for flag in ("--help", "-h"):
        r = _run(sandbox, script, flag)
        assert r.returncode == 0 and r.stdout.startswith(f"usage: bash sample_data/{script} [--force]")
    _untouched(sandbox)


@pytest.mark.parametrize("script", ["table2.sh", "crossmusim.sh"])
def test_unknown_argument_is_refused_before_any_work(sandbox, script):
    r = _run(sandbox, script, "--seeds", "1")
    assert r.returncode == 2 and f"{script}: unknown argument '--seeds'" in r.stderr
    _untouched(sandbox)


@pytest.mark.parametrize("script, earlier", [("table2.sh", "runs/table2 holds an earlier run"),
                                             ("crossmusim.sh", "runs/crossmusim/train holds an earlier run")])
def test_an_earlier_run_is_kept_unless_force_is_given(sandbox, script, earlier):
    r = _run(sandbox, script)
    assert r.returncode == 2 and earlier in r.stderr and "pass --force" in r.stderr
    _untouched(sandbox)
    r = _run(sandbox, script, "--force")  # now it replaces the run, then reaches the first (fake) python
    assert r.returncode != 0 and (sandbox / "called").read_text().startswith("python data.py prepare")
    if script == "table2.sh":
        assert not (sandbox / "runs" / "table2" / "s3407").exists()


@pytest.mark.parametrize("env, message", [
    ({"SEEDS": "3407 x"}, "SEEDS: 'x' is not a positive integer"),
    ({"SEEDS": "0 1"}, "SEEDS: '0' is not a positive integer"),
    ({"SEEDS": "-1"}, "SEEDS: '-1' is not a positive integer"),
    ({"SEEDS": "5 5 5"}, "SEEDS: a seed is given twice"),
    ({"SEEDS": " "}, "SEEDS is empty"),
    ({"JOBS": "0"}, "JOBS: '0' is not a positive integer"),
    ({"JOBS": "two"}, "JOBS: 'two' is not a positive integer"),
    ({"STAGE2_EPOCHS": "-3"}, "STAGE2_EPOCHS: '-3' is not a positive integer")])
def test_table2_checks_seeds_and_jobs_before_any_work(sandbox, env, message):
    """Bug checked: a bad SEEDS or JOBS was noticed only after prepare and mine-pairs had run."""
    r = _run(sandbox, "table2.sh", "--force", **env)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    _untouched(sandbox)
