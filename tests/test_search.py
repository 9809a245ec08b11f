"""Tests of evals/search.py's display: digits that separate the scores, the model's name.

    python -m pytest -q tests/test_search.py
"""
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from own_songs import TINY_BERT, write_songs  # noqa: E402

import evaluate as ev  # noqa: E402
import model as htcl  # noqa: E402
from data import load_catalog  # noqa: E402
from evals import embeddings  # noqa: E402
from evals import search as evsearch  # noqa: E402
from evals.search import score_digits  # noqa: E402


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


def save_tiny_artifact(folder, seed=0, **cfg):
    """A tiny HTCL artifact (8-d embeddings); cfg: HTCLConfig fields (embed_mode, chunk_seconds)."""
    from transformers import AutoTokenizer
    torch.manual_seed(seed)
    config = htcl.HTCLConfig(audio=htcl.AudioConfig(conv_channels=16, hidden=16, layers=1, heads=2, ffn=32,
                                                    pos_conv_kernel=5, pos_conv_groups=2),
                             text_model=TINY_BERT, text_pretrained=False, proj_dims=(12, 8), fusion_dims=(8, 8),
                             **cfg)
    htcl.save_artifact(htcl.HTCL(config), AutoTokenizer.from_pretrained(TINY_BERT), str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def chunk_world(tmp_path_factory):
    """Eight songs of 4-7.5 s whose 2 s windows differ from each other (a sweep): their
    chunked embeddings differ from their whole-song ones. A chunked artifact (2 s windows),
    and a copy of song s3's file outside the catalog."""
    d = tmp_path_factory.mktemp("chunks")
    rng = np.random.default_rng(3)
    os.makedirs(d / "audio")
    rows = []
    for i in range(8):
        t = np.arange(int((4 + 0.5 * i) * 16000)) / 16000
        freq = 150 + 60 * i + 40 * t  # a rising tone: each window its own pitch
        x = 0.3 * np.sign(np.sin(2 * np.pi * freq * t)) * (1 + np.sin(2 * np.pi * (0.3 + 0.2 * i) * t))
        sf.write(d / "audio" / f"s{i}.wav", (x + 0.02 * rng.standard_normal(len(t))).astype(np.float32), 16000)
        rows.append(f"s{i},audio/s{i}.wav,song {i},artist {i % 3},la la\n")
    (d / "catalog.csv").write_text("song_id,audio,title,artists,lyrics\n" + "".join(rows))
    shutil.copy(d / "audio" / "s3.wav", d / "my_song.wav")
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
