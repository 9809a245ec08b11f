"""Tests of tools/device_run.py (every device measurement as one JSON): OLGA's CSV reader and its errors,
and a section that fails records its error while the others' results are still written.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_device_run.py
"""
import csv
import json
import os
import sys
import time

import numpy as np
import pytest

from tools import device_run


def write_olga(folder, n=60, seed=0, p=0.2):
    """A small graph in OLGA's files: edges.csv (src,dst, lower id first) and split.csv."""
    rng = np.random.default_rng(seed)
    split = rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2])
    pairs = sorted({(min(a, b), max(a, b)) for a, b in rng.integers(0, n, (int(p * n * n / 2), 2)) if a != b})
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "split.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("artist_id", "split")] + [(f"a{i}", s) for i, s in enumerate(split)])
    with open(os.path.join(folder, "edges.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("src", "dst")] + [(f"a{a}", f"a{b}") for a, b in pairs])
    return split, pairs


def test_read_olga_keeps_ids_order_and_direction(tmp_path):
    split, pairs = write_olga(tmp_path / "olga")
    artists, got_split, edges = device_run.read_olga(str(tmp_path / "olga"))
    assert artists == [f"a{i}" for i in range(len(split))] and list(got_split) == list(split)
    assert [tuple(e) for e in edges.tolist()] == pairs  # as stored: lower id first, messages first -> second


@pytest.mark.parametrize("broken, message", [
    ("no_split", "no split.csv"),
    ("bad_column", "no column(s) dst"),
    ("unknown_artist", "line 2, column 'dst': artist 'a999' is not in"),
])
def test_read_olga_names_the_file_line_and_column(tmp_path, broken, message):
    folder = tmp_path / "olga"
    write_olga(folder)
    if broken == "no_split":
        os.remove(folder / "split.csv")
    else:
        rows = ["src,target\na0,a1\n", "src,dst\na0,a999\n"][broken == "unknown_artist"]
        (folder / "edges.csv").write_text(rows)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        device_run.read_olga(str(folder))


def test_a_failing_section_is_recorded_and_the_json_still_written(tmp_path):
    """The artist section on a small OLGA-format graph (a child process, tiny sizes), then on a folder
    without its split file: the first run's sweep has both NDCG formulas beside the released log for
    0-4 layers; the second records the error and exits 1, with env still written."""
    write_olga(tmp_path / "good")
    out = tmp_path / "good.json"
    assert device_run.main(["--out", str(out), "--tiny", "--sections", "artist", "--olga", str(tmp_path / "good"),
                            "--max_seeds", "1", "--budget_s", "120"]) == 0
    got = json.loads(out.read_text())
    assert got["errors"] == {} and got["env"]["torch"]
    table = got["artist"]["sweep"]["table"]
    assert sorted(table) == ["0", "1", "2", "3", "4"]
    for n, row in table.items():
        assert row["released_log"] == device_run.RELEASED_NDCG[int(n)]
        assert 0 <= row["ndcg@200_released_formula"][0] < row["ndcg@200"][0] <= 1  # one ideal item too many
        assert row["flops_per_run"] > row["flops_per_step"] > 0
    assert got["artist"]["graph"]["artists"] == 60
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "edges.csv").write_text("src,dst\n")
    bad = tmp_path / "bad.json"
    assert device_run.main(["--out", str(bad), "--tiny", "--sections", "artist", "--olga", str(tmp_path / "bad"),
                            "--budget_s", "60"]) == 1
    got = json.loads(bad.read_text())
    assert "no split.csv" in got["errors"]["artist"]["error"] and got["env"]["device"] == "cpu"
    assert "seconds_per_section" in got and not os.path.exists(str(bad) + ".artist.part")


def test_unknown_section_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="--sections: unknown"):
        device_run.main(["--out", str(tmp_path / "x.json"), "--sections", "bench,artsit"])


def test_a_section_past_its_limit_is_killed_with_its_children(tmp_path):
    """run_limited: a child that outlives its limit is stopped, and so is what it started."""
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f" open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    assert device_run.run_limited([sys.executable, "-c", code], timeout=3) is None
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the kill is asynchronous: wait for the process to be gone (or a zombie, unreaped)
        try:
            os.kill(grandchild, 0)
            with open(f"/proc/{grandchild}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the section's own child survived the time limit")
    assert device_run.run_limited([sys.executable, "-c", "raise SystemExit(3)"], timeout=30) == 3
