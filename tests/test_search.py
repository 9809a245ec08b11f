"""Tests of evals/search.py, similar-song search: a song's own file is found first, song-id queries
leave themselves out, saved embeddings and a faiss index give the model's results, the documented
Python snippet runs, and a missing faiss says how to install it.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_search.py
"""
import csv
import json
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate as ev
import model as htcl
from data import load_catalog
from evals import embeddings, search as evsearch
from evals.search import score_digits

from tests.helpers import ROOT, _write_world, save_tiny_artifact
from tests.own_songs import TINY_BERT, write_songs


@pytest.fixture(scope="module")
def search_world(tiny_world, tmp_path_factory):
    """Eight short, distinct songs, their catalog, and tiny_world's artifact; plus a copy of one
    song's file outside the catalog."""
    def song(i, t):
        return 0.3 * np.sign(np.sin(2 * np.pi * (150 + 90 * i) * t)) * (1 + np.sin(2 * np.pi * (0.5 + i) * t))
    d = _write_songs(tmp_path_factory.mktemp("search"), song, lambda i: 1.5 + 0.25 * i, seed=5)
    return {"dir": d, "catalog": str(d / "catalog.csv"), "model": str(tiny_world / "artifact")}


def _write_songs(d, song, seconds, seed):
    """Eight noisy WAV songs song(i, t) of seconds(i) s, their catalog, and a copy of s3 as my_song.wav."""
    rng = np.random.default_rng(seed)
    os.makedirs(d / "audio")
    rows = []
    for i in range(8):
        t = np.arange(int(seconds(i) * 16000)) / 16000
        x = song(i, t) + 0.02 * rng.standard_normal(len(t))
        sf.write(d / "audio" / f"s{i}.wav", x.astype(np.float32), 16000)
        rows.append(f"s{i},audio/s{i}.wav,song {i},artist {i % 3},la la\n")
    (d / "catalog.csv").write_text("song_id,audio,title,artists,lyrics\n" + "".join(rows))
    shutil.copy(d / "audio" / "s3.wav", d / "my_song.wav")
    return d


def _brute_force_top(keys, query, k, leave_out=None):
    """Song rows by descending cosine with a plain numpy loop."""
    cos = [float(np.dot(query, v) / np.linalg.norm(query) / np.linalg.norm(v)) for v in keys]
    order = [r for r in sorted(range(len(keys)), key=lambda r: -cos[r]) if r != leave_out]
    return order[:k], [cos[r] for r in order[:k]]


def _by_query(records):
    by = {}
    for r in records:
        by.setdefault(r["query"], []).append(r)
    return by


def test_search_finds_a_songs_own_file_first_and_a_song_id_leaves_itself_out(search_world, tmp_path):
    from data import load_catalog
    from model import load_artifact
    w = search_world
    model, tokenizer = load_artifact(w["model"])
    keys = embeddings.embed_catalog(model, tokenizer, load_catalog(w["catalog"]))["audio"]
    out = ev.main(["search", "--model", w["model"], "--catalog", w["catalog"], "--query",
                   str(w["dir"] / "my_song.wav"), "--query", "s5", "--k", "4", "--out", str(tmp_path / "r.csv")])
    by_query = _by_query(out)
    mine = by_query[str(w["dir"] / "my_song.wav")]
    assert mine[0]["song_id"] == "s3" and mine[0]["score"] > 0.9999  # a file outside the catalog, its twin first
    query = evsearch.embed_audio_files(model, [str(w["dir"] / "my_song.wav")])[0]
    assert np.allclose(query, keys[3], atol=1e-5)  # embedded as `embed` embeds its catalog twin
    rows, cos = _brute_force_top(keys, query, 4)
    assert [r["song_id"] for r in mine] == [f"s{r}" for r in rows]
    assert cos[0] - cos[1] > 1e-4, "the test needs a margin between the twin and the next song"
    s5 = by_query["s5"]
    rows, cos = _brute_force_top(keys, keys[5], 4, leave_out=5)
    assert [r["song_id"] for r in s5] == [f"s{r}" for r in rows]  # s5 itself is not among them
    assert np.allclose([r["score"] for r in s5], cos, atol=1e-5)
    assert [r["rank"] for r in s5] == [1, 2, 3, 4]
    assert s5[0]["title"] == f"song {rows[0]}" and s5[0]["artists"] == f"artist {rows[0] % 3}"
    with open(tmp_path / "r.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == ["query", "rank", "song_id", "score", "title", "artists"]
    assert [(r["query"], r["rank"], r["song_id"]) for r in written] == \
        [(r["query"], str(r["rank"]), r["song_id"]) for r in out]


def test_search_from_saved_embeddings_and_faiss_index_gives_the_model_s_results(search_world, tmp_path, capsys):
    w = search_world
    args = ["--catalog", w["catalog"], "--query", "s2", "--query", str(w["dir"] / "audio" / "s6.wav"), "--k", "3"]
    direct = ev.main(["search", "--model", w["model"], *args, "--out", str(tmp_path / "a.json")])
    emb = str(tmp_path / "emb")
    try:
        import faiss  # noqa: F401
        index = True
    except ImportError:  # faiss-cpu is optional: the exact path is still tested
        index = False
    ev.main(["embed", "--artifact", w["model"], "--catalog", w["catalog"], "--out", emb]
            + ["--index", "faiss"] * index)
    saved = ev.main(["search", "--emb", emb, "--model", w["model"], *args])
    key = lambda rs: [(r["query"], r["song_id"]) for r in rs]  # noqa: E731
    assert key(saved) == key(direct)
    assert np.allclose([r["score"] for r in saved], [r["score"] for r in direct], atol=1e-5)
    assert json.load(open(tmp_path / "a.json")) == direct  # --out .json: the same records
    if index:
        assert os.path.exists(os.path.join(emb, "audio.faiss"))
        capsys.readouterr()
        via = ev.main(["search", "--emb", emb, "--model", w["model"], *args, "--index", "faiss"])
        assert "building" not in capsys.readouterr().out  # the saved index was used
        assert key(via) == key(direct)
    only_ids = ev.main(["search", "--emb", emb, "--catalog", w["catalog"], "--query", "s2", "--k", "3"])
    assert key(only_ids) == key(direct)[:3]  # song-id queries need no model
    with pytest.raises(ValueError, match=r"s6.wav: an audio file; embedding it needs --model"):
        ev.main(["search", "--emb", emb, *args])


def test_search_query_that_is_both_file_and_song_id_or_neither_is_refused(search_world, tmp_path, monkeypatch):
    w = search_world
    monkeypatch.chdir(w["dir"] / "audio")  # here "s1.wav" is a file; make it a song id too
    with pytest.raises(ValueError, match=r"--query s1.wav: both a file and a song_id of c; write ./s1.wav"):
        evsearch.parse_queries(["s1.wav"], {"s1.wav": 0}, "c")
    assert evsearch.parse_queries(["./s1.wav", "id:s1.wav", "s2"], {"s1.wav": 0, "s2": 1}, "c") == \
        [("file", "./s1.wav"), ("song", "s1.wav"), ("song", "s2")]
    with pytest.raises(ValueError, match=r"--query s9: no such file, and no song_id 's9' in .*catalog.csv"):
        ev.main(["search", "--model", w["model"], "--catalog", w["catalog"], "--query", "s9"])
    with pytest.raises(ValueError, match=r"--out r.txt: .*\.csv or \.json"):
        ev.main(["search", "--model", w["model"], "--catalog", w["catalog"], "--query", "s1", "--out", "r.txt"])


def test_faiss_index_top_k_equals_exact_torch_top_k():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    keys = (rng.standard_normal((40, 16))[rng.integers(0, 40, 3000)]
            + 0.5 * rng.standard_normal((3000, 16))).astype(np.float32)
    queries = keys[:50] + 0.1 * rng.standard_normal((50, 16)).astype(np.float32)
    exclude = np.where(np.arange(50) % 2 == 0, np.arange(50), -1)  # half song-id queries, half files
    want_s, want_r = evsearch.search(queries, keys, 10, exclude)
    assert not (want_r == exclude[:, None]).any()
    for index in (evsearch.build_index(keys),  # exact: IndexFlatIP
                  evsearch.build_index(keys, approx_from=1000, nprobe=10_000)):  # IVF scanning every cell: exact too
        got_s, got_r = evsearch.search(queries, keys, 10, exclude, index)
        assert (got_r == want_r).all()
        assert np.allclose(got_s, want_s, atol=1e-5)
    ivf = evsearch.build_index(keys, approx_from=1000, nprobe=4)  # 64 cells, 4 scanned: approximate, most found
    got_s, got_r = evsearch.search(queries, keys, 10, exclude, ivf)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_r, want_r)])
    assert 0.5 < recall <= 1 and (got_s[got_r >= 0] <= want_s[:, :1].max() + 1e-5).all()


def test_matching_with_a_faiss_index_gives_the_exact_hit_rate(tmp_path, capsys):
    faiss = pytest.importorskip("faiss")
    emb = _write_world(tmp_path)
    c, e = str(tmp_path / "catalog.csv"), str(tmp_path / "e.npy")
    args = ["matching", "--catalog", c, "--emb", e, "--emb", "random:8", "--favourites",
            str(tmp_path / "favourites.csv"), "--triggers", "4", "--per_trigger", "3", "--list_size", "6"]
    exact = ev.main(args)
    faiss.write_index(evsearch.build_index(np.load(e)), str(tmp_path / "e.faiss"))  # rows in e.ids.txt's order
    capsys.readouterr()
    via = ev.main(args + ["--index", "faiss"])
    assert "other order" in capsys.readouterr().out  # not the catalog's order: rebuilt, not misread
    for name in ("e", "random:8"):
        assert via[name]["hr"] == exact[name]["hr"] and via[name]["users"] == exact[name]["users"] == 12
    assert 0 < exact["e"]["hr"] < 1 or exact["e"]["hr"] != exact["random:8"]["hr"]
    # catalog order: the saved index itself is used
    np.save(tmp_path / "c.npy", emb)
    (tmp_path / "c.ids.txt").write_text("".join(f"s{i}\n" for i in range(len(emb))))
    faiss.write_index(evsearch.build_index(emb), str(tmp_path / "c.faiss"))
    args[args.index(e)] = str(tmp_path / "c.npy")
    capsys.readouterr()
    assert ev.main(args + ["--index", "faiss"])["c"]["hr"] == exact["e"]["hr"]
    assert "other order" not in capsys.readouterr().out


def test_the_documented_python_search_snippet_runs_and_finds_a_songs_own_file(search_world, tmp_path, capsys):
    import textwrap
    w = search_world
    emb = str(tmp_path / "emb")
    ev.main(["embed", "--artifact", w["model"], "--catalog", w["catalog"], "--out", emb])
    doc = evsearch.__doc__.split("Similar songs from Python")[1].split("\n", 1)[1]
    snippet = textwrap.dedent("".join(line + "\n" for line in doc.splitlines() if line.startswith("  ")))
    readme = open(os.path.join(ROOT, "README.md")).read().split("**From Python**")[1]
    readme = readme.split("```python\n")[1].split("```")[0]
    for old, new in (("runs/demo/finetune/final", w["model"]), ("emb/htcl", emb), ("runs/demo/emb", emb),
                     ("my_song.wav", str(w["dir"] / "my_song.wav")), ("sample_data/catalog.csv", w["catalog"])):
        snippet, readme = snippet.replace(old, new), readme.replace(old, new)
    for code in (snippet, readme):
        capsys.readouterr()
        exec(compile(code, "snippet", "exec"), {})
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 8 and lines[0].split()[1:3] == ["s3", "song"]  # its twin first, 8 songs listed


def test_index_faiss_without_faiss_installed_says_how_to_install_it(search_world, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` meets where it is not installed
    with pytest.raises(ModuleNotFoundError, match="pip install faiss-cpu"):
        evsearch.build_index(np.ones((3, 4), dtype=np.float32))
    with pytest.raises(ModuleNotFoundError, match="--index faiss needs the optional package faiss-cpu"):
        ev.main(["search", "--model", search_world["model"], "--catalog", search_world["catalog"],
                 "--query", "s1", "--index", "faiss"])
    with pytest.raises(SystemExit, match="^Error: --index faiss needs the optional package faiss-cpu"):
        ev.cli(["search", "--model", search_world["model"], "--catalog", search_world["catalog"],
                "--query", "s1", "--index", "faiss"])  # the command line: one line, no traceback


def test_score_digits_separate_close_scores_and_stay_at_four_otherwise():
    assert score_digits([0.51, 0.73, 0.2]) == 4
    close = [1.0, 0.99971, 0.9997, 0.99968]  # gaps of 1e-5 and 2e-5: five decimals tell them apart
    d = score_digits(close)
    assert d == 5 and len({f"{s:.{d}f}" for s in close}) == 4 and len({f"{s:.4f}" for s in close}) < 4
    assert score_digits([0.5, 0.5 + 1e-12]) == 7  # float32 holds no more


def test_search_names_the_model_and_prints_distinct_scores_of_a_collapsed_model(tmp_path, capsys):
    from transformers import AutoTokenizer
    catalog = write_songs(str(tmp_path), n=8)
    torch.manual_seed(0)
    cfg = htcl.HTCLConfig(audio=htcl.AudioConfig(conv_channels=16, hidden=16, layers=1, heads=2, ffn=32,
                                                 pos_conv_kernel=5, pos_conv_groups=2),
                          text_model=TINY_BERT, text_pretrained=False, proj_dims=(12, 8), fusion_dims=(8, 8))
    model = htcl.HTCL(cfg)
    with torch.no_grad():  # collapsed: one shared direction, a little variation in another
        model.audio_proj[-1].weight.mul_(0.02)
        model.audio_proj[-1].bias.zero_()
        model.audio_proj[-1].bias[0] = 1.0
    artifact = tmp_path / "runs" / "mymodel" / "final"
    htcl.save_artifact(model, AutoTokenizer.from_pretrained(TINY_BERT), str(artifact))
    records = ev.main(["search", "--model", str(artifact), "--catalog", catalog, "--query", "s1", "--k", "7"])
    out = capsys.readouterr().out
    assert f"search: model mymodel ({artifact})" in out
    scores = np.array([r["score"] for r in records])
    assert scores.min() > 0.999 and len({f"{s:.4f}" for s in scores}) < 7  # alike at four decimals ...
    printed = [line.split("|")[2].strip() for line in out.splitlines() if line.startswith("| ") and "rank" not in line]
    assert len(printed) == 7 and len(set(printed)) == 7, printed  # ... told apart here


@pytest.fixture(scope="module")
def chunk_world(tmp_path_factory):
    """Eight songs of 4-7.5 s whose 2 s windows differ from each other (a sweep): their
    chunked embeddings differ from their whole-song ones. A chunked artifact (2 s windows),
    and a copy of song s3's file outside the catalog."""
    def song(i, t):
        freq = 150 + 60 * i + 40 * t  # a rising tone: each window its own pitch
        return 0.3 * np.sign(np.sin(2 * np.pi * freq * t)) * (1 + np.sin(2 * np.pi * (0.3 + 0.2 * i) * t))
    d = _write_songs(tmp_path_factory.mktemp("chunks"), song, lambda i: 4 + 0.5 * i, seed=3)
    art = save_tiny_artifact(d / "chunked", embed_mode="chunked", chunk_seconds=2.0)
    return {"dir": d, "catalog": str(d / "catalog.csv"), "model": art, "query": str(d / "my_song.wav")}


def _search(*argv):
    return ev.main(["search", *argv])


def test_chunked_artifact_embeds_file_queries_in_its_own_windows(chunk_world):
    """Bug checked: the query was embedded whole (or in 10 s windows) while the catalog was
    embedded in the artifact's 2 s windows, so a song's own file did not come back first."""
    w = chunk_world
    model, tokenizer = htcl.load_artifact(w["model"])
    catalog = load_catalog(w["catalog"])
    keys = embeddings.embed_catalog(model, tokenizer, catalog)["audio"]  # the artifact's mode: 2 s windows
    whole = embeddings.embed_catalog(model, tokenizer, catalog, mode="full")["audio"]
    assert np.abs(keys[3] - whole[3]).max() > 1e-3, "the test needs chunked != whole for the twin"
    assert np.allclose(evsearch.embed_audio_files(model, [w["query"]])[0], keys[3], atol=1e-5)
    emb = str(w["dir"] / "emb")
    ev.main(["embed", "--artifact", w["model"], "--catalog", w["catalog"], "--out", emb])
    for source in (["--model", w["model"]], ["--model", w["model"], "--emb", emb]):
        out = _search("--catalog", w["catalog"], "--query", w["query"], "--k", "3", *source)
        assert out[0]["song_id"] == "s3" and out[0]["score"] > 0.9999, source


def test_embeddings_of_an_artifact_retrained_at_the_same_path_are_refused(chunk_world, tmp_path):
    """Bug checked: the stale embeddings were used silently (a song's own file came back sixth)."""
    w = chunk_world
    art = save_tiny_artifact(tmp_path / "art", seed=0)
    emb = str(tmp_path / "emb")
    ev.main(["embed", "--artifact", art, "--catalog", w["catalog"], "--out", emb])
    prov = embeddings.read_provenance(emb)
    assert prov["artifact_sha256"] == embeddings.artifact_digest(art) and prov["embed_mode"] == "full"
    assert prov["mel"]["hop_length"] == 1536 and prov["kinds"] == ["audio"] and prov["chunk_seconds"] is None
    ok = _search("--catalog", w["catalog"], "--emb", emb, "--model", art, "--query", w["query"], "--k", "2")
    assert ok[0]["song_id"] == "s3"
    save_tiny_artifact(tmp_path / "art", seed=1)  # retrained in place
    with pytest.raises(ValueError, match=r"emb \(embedded\) and the artifact now at .*art were made by different"):
        _search("--catalog", w["catalog"], "--emb", emb, "--model", art, "--query", w["query"])
    with pytest.raises(ValueError, match=r"different weights"):  # a song-id query reads the same stale vectors
        _search("--catalog", w["catalog"], "--emb", emb, "--query", "s2")
    other = save_tiny_artifact(tmp_path / "other", seed=2)  # fresh embeddings, but a model other than theirs
    ev.main(["embed", "--artifact", art, "--catalog", w["catalog"], "--out", emb])
    with pytest.raises(ValueError, match=r"--emb .*emb and --model .*other were made by different weights"):
        _search("--catalog", w["catalog"], "--emb", emb, "--model", other, "--query", w["query"])


def test_embeddings_of_another_width_are_one_line_naming_both(chunk_world, tmp_path):
    """Bug checked: a matmul shape error deep in the search."""
    w = chunk_world
    np.save(tmp_path / "base.npy", np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32))
    (tmp_path / "base.ids.txt").write_text("".join(f"s{i}\n" for i in range(8)))
    with pytest.raises(ValueError, match=r"base.npy holds 5-d embeddings but --model .* makes 8-d"):
        _search("--catalog", w["catalog"], "--emb", str(tmp_path / "base.npy"), "--model", w["model"],
                "--query", w["query"])


@pytest.mark.parametrize("k", ["-3", "0", "two"])
def test_k_that_is_not_a_positive_integer_is_a_usage_error(chunk_world, k, capsys):
    """Bug checked: --k -3 was torch's 'selected index k out of range', --k 0 an empty answer."""
    with pytest.raises(SystemExit) as e:
        _search("--catalog", chunk_world["catalog"], "--model", chunk_world["model"], "--query", "s1", "--k", k)
    assert e.value.code == 2 and f"--k: expected a positive integer, got '{k}'" in capsys.readouterr().err


@pytest.mark.parametrize("k", [7, 8, 20])
def test_song_id_query_never_gets_itself_back_even_when_k_covers_the_catalog(k):
    """Bug checked (made by hand): with k >= the catalog size the excluded song came back last."""
    keys = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    scores, rows = evsearch.search(keys[[5]], keys, k, exclude=np.array([5]))
    listed = rows[0][rows[0] >= 0]
    assert 5 not in listed and len(listed) == min(k, 7)
    cos = keys @ keys[5] / np.linalg.norm(keys, axis=1) / np.linalg.norm(keys[5])
    want = [r for r in np.argsort(-cos, kind="stable") if r != 5][:k]
    assert list(listed) == want and np.allclose(scores[0][:len(listed)], cos[want], atol=1e-5)


def test_faiss_index_records_its_embeddings_and_a_stale_or_foreign_one_is_refused(chunk_world, tmp_path):
    pytest.importorskip("faiss")  # faiss-cpu is optional: pip install faiss-cpu
    w = chunk_world
    emb = str(tmp_path / "emb")
    ev.main(["embed", "--artifact", w["model"], "--catalog", w["catalog"], "--out", emb, "--index", "faiss"])
    record = embeddings.read_json(os.path.join(emb, "audio.faiss.json"))
    prov = embeddings.read_provenance(emb)
    assert record["kind"] == "audio" and record["artifact_sha256"] == prov["artifact_sha256"]
    assert record["embed_mode"] == "chunked" and record["chunk_seconds"] == 2.0 and len(record["embeddings_sha256"]) == 64
    args = ["--catalog", w["catalog"], "--emb", emb, "--model", w["model"], "--query", w["query"], "--k", "2"]
    assert _search(*args, "--index", "faiss")[0]["song_id"] == "s3"
    keys = np.load(os.path.join(emb, "audio.npy"))
    np.save(os.path.join(emb, "audio.npy"), keys[::-1].copy())  # other vectors under the same index
    with pytest.raises(ValueError, match=r"audio.faiss indexes other vectors than .*audio.npy holds"):
        _search(*args, "--index", "faiss")
    np.save(os.path.join(emb, "audio.npy"), keys)
    record["embed_mode"] = "full"  # an index of full-song embeddings beside chunked ones
    embeddings.write_json(os.path.join(emb, "audio.faiss.json"), record)
    with pytest.raises(ValueError, match=r"audio.faiss and its embeddings differ in embed_mode: full .* vs chunked"):
        _search(*args, "--index", "faiss")
    ev.main(["embed", "--artifact", w["model"], "--catalog", w["catalog"], "--out", emb])  # no --index: both go
    assert not os.path.exists(os.path.join(emb, "audio.faiss")) and not os.path.exists(emb + "/audio.faiss.json")
