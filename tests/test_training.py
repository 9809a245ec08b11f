"""Tests of training.py's out_dir rule: a used run folder is refused, or emptied with --overwrite,
never appended to.

    python -m pytest -q tests/test_training.py
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from own_songs import stage1_argv, write_world  # noqa: E402

import pretrain  # noqa: E402


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
