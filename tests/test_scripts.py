"""Tests of the commands the README gives for one's own songs: `accelerate launch` with the shipped
presets/accelerate.yaml prints no defaults warning.

    python -m pytest -q tests/test_scripts.py
"""
import os
import re
import subprocess
import sys

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
