"""Tests of evaluate.py's probe table: its chance column.

    python -m pytest -q tests/test_evaluate.py
"""
import csv
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as ev  # noqa: E402
from data import load_catalog  # noqa: E402


def test_probe_chance_is_the_test_sets_majority_share_not_the_training_sets():
    rng = np.random.default_rng(0)
    # train: 6 a, 2 b (majority share 0.75); test: 2 b, 1 a (majority share 2/3)
    labels = ["a"] * 6 + ["b"] * 2 + ["b", "b", "a"]
    split = ["train"] * 8 + ["test"] * 3
    r = ev.run_probe(rng.standard_normal((11, 4)), labels, split, seeds=(0,), epochs=2)
    assert r["chance"] == pytest.approx(2 / 3)
    # Without a split each seed draws its own test set: the mean of their majority shares.
    n = 200
    labels = np.where(rng.random(n) < 0.7, "x", "y").tolist()
    r = ev.run_probe(rng.standard_normal((n, 4)), labels, None, seeds=(0, 1), epochs=2)
    shares = []
    for seed in (0, 1):
        test = np.random.default_rng(seed).random(n) < 0.2  # run_probe's seeded draw
        t = np.asarray(labels)[test]
        shares.append(max((t == "x").mean(), (t == "y").mean()))
    assert r["chance"] == pytest.approx(np.mean(shares))


def test_probe_table_prints_the_chance_column(tmp_path, capsys):
    rows = ["song_id,audio,title,artists,lyrics,genre,split"]
    rows += [f"s{i},a{i}.wav,t{i},,,{'a' if i < 6 else 'b'},train" for i in range(8)]
    rows += ["s8,a8.wav,t8,,,b,test", "s9,a9.wav,t9,,,b,test", "s10,a10.wav,t10,,,a,test"]
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    np.save(tmp_path / "e.npy", np.random.default_rng(1).standard_normal((11, 3)).astype(np.float32))
    (tmp_path / "e.ids.txt").write_text("".join(f"s{i}\n" for i in range(11)))
    ev.main(["probe", "--catalog", str(tmp_path / "c.csv"), "--emb", str(tmp_path / "e.npy"), "--label", "genre",
             "--seeds", "1", "--epochs", "2"])
    out = capsys.readouterr().out
    header, _, row = [line for line in out.splitlines() if line.startswith("|")]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["chance (test majority)"] == "0.6667"


def _probe_world(tmp_path, n=60, seed=3):
    """A catalog with genre and a split column (no audio is read: the embeddings are a file)."""
    rng = np.random.default_rng(seed)
    genres = rng.choice(["rock", "jazz", "folk"], n)
    with open(tmp_path / "catalog.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["song_id", "audio", "title", "artists", "lyrics", "genre", "split"])
        for i in range(n):
            w.writerow([f"s{i}", f"audio/s{i}.wav", f"t{i}", "a", "la", genres[i], "test" if i % 4 == 0 else "train"])
    emb = np.eye(3)[np.searchsorted(["folk", "jazz", "rock"], genres)] + 0.8 * rng.standard_normal((n, 3))
    np.save(tmp_path / "e.npy", emb.astype(np.float32))
    (tmp_path / "e.ids.txt").write_text("".join(f"s{i}\n" for i in range(n)))
    return tmp_path / "catalog.csv"


def _report(tmp_path, *extra):
    return ev.main(["report", "--catalog", str(tmp_path / "catalog.csv"), "--emb", str(tmp_path / "e.npy"),
                    "--out", str(tmp_path / "rep"), "--probe_seeds", "1", "--workers", "1", *extra])


def test_report_trains_the_probe_again_when_the_split_changed(tmp_path, capsys):
    """Bug checked (made by hand): the split was left out of the reuse key, so a report after the
    split column changed showed the accuracy of the old split."""
    pytest.importorskip("matplotlib")
    path = _probe_world(tmp_path)
    _report(tmp_path)
    assert "reused" not in capsys.readouterr().out
    _report(tmp_path)
    assert "probe genre reused" in capsys.readouterr().out  # the same inputs: reused
    text = path.read_text().replace(",train\n", ",TMP\n").replace(",test\n", ",train\n").replace(",TMP\n", ",test\n")
    path.write_text(text)  # train and test swapped
    reused = _report(tmp_path)["table"]
    assert "reused" not in capsys.readouterr().out
    fresh = _report(tmp_path, "--no-reuse")["table"]
    assert reused.splitlines()[2] == fresh.splitlines()[2]
    catalog = load_catalog(path)
    split = [catalog.label(r, "split") for r in range(len(catalog))]
    assert split.count("test") == 45  # the swap really moved the test rows


@pytest.mark.parametrize("content, message", [
    ('["a", "b"]', r"results.json: holds a JSON list, expected the report's saved results"),
    ('{"ab12": [0.5, 0.1]', r"results.json: not valid JSON \(.*\); expected the report's saved results")])
def test_a_bad_saved_results_file_stops_the_report_before_any_training(tmp_path, capsys, content, message):
    """Bug checked: a results.json holding a list was an AttributeError after all the training,
    and no table2.md was written; a truncated one was json's error without the file's name."""
    _probe_world(tmp_path)
    os.makedirs(tmp_path / "rep")
    (tmp_path / "rep" / "results.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        _report(tmp_path)
    assert "probe genre" not in capsys.readouterr().out  # nothing trained
    _report(tmp_path, "--no-reuse")  # the way out the message names


ROWS = ("stage1", "htcl_w_cf", "htcl_wo_text", "htcl", "random")


def _seed_folder(tmp_path, i, content=None):
    d = tmp_path / f"s{i}"
    d.mkdir(exist_ok=True)
    genre = {"stage1": 0.5, "htcl_w_cf": 0.41, "htcl_wo_text": 0.62, "htcl": 0.7, "random": 0.2}
    lang = {"stage1": 0.6, "htcl_w_cf": 0.33, "htcl_wo_text": 0.44, "htcl": 0.8, "random": 0.1}
    rows = {k: {"acc_genre": [genre[k] + 0.01 * i, 0.0], "acc_language": [lang[k] + 0.01 * i, 0.0],
                "hr@100": 0.1 + 0.01 * ROWS.index(k)} for k in ROWS}
    (d / "table2.json").write_text(content if content is not None else json.dumps(rows))
    return str(d)


def test_each_table2_row_shows_its_own_runs_numbers(tmp_path):
    """Bug checked (made by hand): the HTCL_w_CF and HTCL_w/o_text rows showed each other's numbers.
    Every row's numbers differ here, so any mix-up of the rows is seen."""
    out = ev.main(["table2", _seed_folder(tmp_path, 0), _seed_folder(tmp_path, 1), "--out", str(tmp_path / "t2")])
    want = {"Stage 1 (CLAP)": (0.505, 0.605), "HTCL_w_CF": (0.415, 0.335), "HTCL_w/o_text": (0.625, 0.445),
            "HTCL": (0.705, 0.805), "random": (0.205, 0.105)}
    for row, (genre, lang) in want.items():
        assert out["rows"][row]["acc_genre"]["mean"] == pytest.approx(genre)
        assert out["rows"][row]["acc_language"]["mean"] == pytest.approx(lang)
    lines = (tmp_path / "t2" / "table2.md").read_text().splitlines()
    for line, (row, (genre, lang)) in zip(lines[2:7], want.items()):
        assert line.startswith(f"| {row} | {genre:.4f} ± 0.0071 | {lang:.4f} ± 0.0071 |"), line
    gaps = {t["target"].split(" below")[0]: t["minus_htcl"] for t in out["targets"] if "minus_htcl" in t}
    assert gaps["HTCL_w_CF"]["acc_genre"] == pytest.approx(0.415 - 0.705)
    assert gaps["HTCL_w/o_text"]["acc_language"] == pytest.approx(0.445 - 0.805)


def test_table2_refuses_a_folder_given_twice_and_names_a_bad_file(tmp_path):
    a = _seed_folder(tmp_path, 0)
    with pytest.raises(SystemExit, match=r"table2: .*s0 is given twice"):
        ev.main(["table2", a, a, a, "--out", str(tmp_path / "t2")])
    with pytest.raises(SystemExit, match=r"table2: .*s0/ is given twice"):
        ev.main(["table2", a, a + "/", "--out", str(tmp_path / "t2")])
    b = _seed_folder(tmp_path, 1, content='{"stage1": {"acc_genre": [0.5,')
    with pytest.raises(ValueError, match=r"s1/table2.json: not valid JSON"):
        ev.main(["table2", a, b, "--out", str(tmp_path / "t2")])


@pytest.mark.parametrize("argv, flag", [
    (["report", "--probe_seeds", "0"], "--probe_seeds"), (["report", "--workers", "-1"], "--workers"),
    (["report", "--ranking_seeds", "-1"], "--ranking_seeds"), (["report", "--triggers", "0"], "--triggers"),
    (["matching", "--favourites", "f", "--list_size", "0"], "--list_size"),
    (["matching", "--favourites", "f", "--per_trigger", "-2"], "--per_trigger"),
    (["probe", "--random_split", "1.5"], "--random_split"), (["probe", "--lr", "-0.001"], "--lr"),
    (["probe", "--epochs", "0"], "--epochs"), (["probe", "--batch_size", "0"], "--batch_size"),
    (["ranking", "--impressions", "i", "--train_days", "7-1"], "--train_days"),
    (["ranking", "--impressions", "i", "--max_len", "0"], "--max_len"),
    (["distance", "--bins", "0"], "--bins"), (["retrieval", "--tag", "genre", "--k", "-3"], "--k")])
def test_flag_values_of_the_wrong_sign_or_size_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main([argv[0], "--catalog", "c.csv", "--emb", "random", *argv[1:]])
    assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err


def test_ranking_refuses_a_test_day_that_is_also_a_training_day():
    """The test impressions would be trained on: an AUC returned as if correct."""
    imp = {"user_id": np.array(["u"] * 4, dtype=object), "row": np.array([0, 1, 2, 3]), "day": np.array([1, 2, 3, 3]),
           "clicked": np.array([1, 0, 1, 0], dtype=bool), "favoured": np.array([0, 0, 1, 0], dtype=bool)}
    with pytest.raises(ValueError, match=r"test impressions on day 3; .* and the test day no training day"):
        ev.run_ranking(np.eye(4, dtype=np.float32), imp, "ctr", train_days=[1, 2, 3], test_day=3)
