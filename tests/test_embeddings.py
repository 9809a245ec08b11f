"""Tests of evals/embeddings.py: embedding files aligned to the catalog by song_id (ids.txt, BOM
and spaces), `evaluate.py embed` (normalized, batch-independent, chunked 10 s windows, an artifact's
own chunk length), and labelled pair files for Figure 2.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_embeddings.py
"""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import data
import evaluate as ev
from data import MIN_FRAMES, Collator, load_catalog, seconds_to_frames, song_mel
from evals import embeddings
from evals import search as evsearch
import model as htcl

from tests.helpers import _write_world, save_tiny_artifact


def test_embeddings_file_is_aligned_to_the_catalog_by_song_id(tmp_path):
    from data import load_catalog
    emb = _write_world(tmp_path)
    catalog = load_catalog(tmp_path / "catalog.csv")
    got = embeddings.song_embeddings(str(tmp_path / "e.npy"), catalog)
    assert np.allclose(got, emb)
    (tmp_path / "e.ids.txt").write_text("".join(f"s{i}\n" for i in range(1, 81)))  # s0 missing, s80 unknown
    with pytest.raises(ValueError, match="no embedding for 1 of 80 songs, e.g. s0"):
        embeddings.song_embeddings(str(tmp_path / "e.npy"), catalog)
    folder = tmp_path / "embed_out"
    embeddings.save_embeddings(folder, [s.song_id for s in catalog.songs], {"audio": emb})
    assert np.allclose(embeddings.song_embeddings(str(folder), catalog), emb)
    with pytest.raises(FileNotFoundError, match="no text.npy"):
        embeddings.song_embeddings(str(folder), catalog, kind="text")


def test_embed_writes_normalized_embeddings_that_do_not_depend_on_batching(tiny_world):
    d = tiny_world
    for batch in ("1", "3"):
        ev.main(["embed", "--artifact", str(d / "artifact"), "--catalog", str(d / "catalog.csv"),
                 "--out", str(d / f"emb{batch}"), "--text", "--fused", "--batch_size", batch])
    assert (d / "emb1" / "ids.txt").read_text() == "s0\ns1\ns2\n"
    for kind in embeddings.KINDS:
        a, b = np.load(d / "emb1" / f"{kind}.npy"), np.load(d / "emb3" / f"{kind}.npy")
        assert a.shape == (3, 8) and a.dtype == np.float32
        assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
        assert np.allclose(a, b, atol=1e-5)  # padding in a batch changes nothing
    # an artifact given as --emb is embedded on the fly, the same way
    from data import load_catalog
    catalog = load_catalog(d / "catalog.csv")
    on_the_fly = embeddings.song_embeddings(str(d / "artifact"), catalog, kind="fused")
    assert np.allclose(on_the_fly, np.load(d / "emb1" / "fused.npy"), atol=1e-5)


def test_chunked_embedding_is_the_mean_of_10s_windows(tiny_world):
    from data import MIN_FRAMES, load_catalog, song_mel
    from model import load_artifact
    d = tiny_world
    model, tokenizer = load_artifact(str(d / "artifact"))
    catalog = load_catalog(d / "catalog.csv")
    got = embeddings.embed_catalog(model, tokenizer, catalog, mode="chunked", batch_size=2)["audio"]
    for r in range(3):
        mel = song_mel(catalog[r].audio)
        starts = [s for s in range(0, len(mel), embeddings.CHUNK_FRAMES)
                  if s == 0 or len(mel) - s >= MIN_FRAMES]
        if r == 0:
            assert len(mel) == 261 and starts == [0, 104, 208]  # 25 s: two full windows and 53 frames
        with torch.no_grad():
            chunks = [model.encode_audio(mel[s:s + embeddings.CHUNK_FRAMES][None], normalize=False)[0] for s in starts]
        want = F.normalize(torch.stack(chunks).mean(0), dim=0).numpy()
        assert np.allclose(got[r], want, atol=1e-5)
    full = embeddings.embed_catalog(model, tokenizer, catalog, mode="full")["audio"]
    assert np.allclose(full[1:], got[1:], atol=1e-5)  # songs under 10 s are one window: both modes agree
    assert not np.allclose(full[0], got[0], atol=1e-3)


def test_figure2_pairs_read_labelled_files_and_stage2_pairs(tmp_path):
    _write_world(tmp_path)
    from data import load_catalog
    catalog = load_catalog(tmp_path / "catalog.csv")
    (tmp_path / "l.csv").write_text("anchor,song,label\ns0,s1,positive\ns0,s2,0\ns3,nope,1\n")
    a, s, pos = embeddings.read_labelled_pairs(tmp_path / "l.csv", catalog)  # the unknown song is dropped aloud
    assert a.tolist() == [0, 0] and s.tolist() == [1, 2] and pos.tolist() == [True, False]
    (tmp_path / "p.csv").write_text("trigger_song_id,rec_song_id\ns0,s1\ns5,s6\n")
    a, s, pos = embeddings.read_labelled_pairs(tmp_path / "p.csv", catalog)
    assert a.tolist() == [0, 5, 0, 5] and s[:2].tolist() == [1, 6] and pos.tolist() == [True, True, False, False]
    assert s[2] not in (0, 1) and s[3] not in (5, 6)
    (tmp_path / "bad.csv").write_text("anchor,song,label\ns0,s1,maybe\n")
    with pytest.raises(ValueError, match=r"bad.csv: line 2, column 'label'"):
        embeddings.read_labelled_pairs(tmp_path / "bad.csv", catalog)


def test_artifact_trained_for_chunks_is_embedded_by_chunks_of_its_length_by_default(tiny_world, tmp_path):
    from data import load_catalog, song_mel
    d = tiny_world
    model, tokenizer = htcl.load_artifact(str(d / "artifact"))
    model.cfg.embed_mode, model.cfg.chunk_seconds = "chunked", 2.5
    htcl.save_artifact(model, tokenizer, str(tmp_path / "art"))
    catalog = load_catalog(d / "catalog.csv")
    ev.main(["embed", "--artifact", str(tmp_path / "art"), "--catalog", str(d / "catalog.csv"),
             "--out", str(tmp_path / "emb"), "--batch_size", "2"])
    assert json.loads((tmp_path / "emb" / "meta.json").read_text())["mode"] == "chunked"
    got = np.load(tmp_path / "emb" / "audio.npy")
    for r in range(3):  # hand loop over the song's 26-frame (2.5 s) windows
        mel = song_mel(catalog[r].audio)
        starts = [s for s in range(0, len(mel), 26) if s == 0 or len(mel) - s >= data.MIN_FRAMES]
        with torch.no_grad():
            chunks = [model.encode_audio(mel[s:s + 26][None], normalize=False)[0] for s in starts]
        np.testing.assert_allclose(got[r], F.normalize(torch.stack(chunks).mean(0), dim=0).numpy(), atol=1e-5)
    ev.main(["embed", "--artifact", str(tmp_path / "art"), "--catalog", str(d / "catalog.csv"),
             "--out", str(tmp_path / "full"), "--mode", "full"])  # an explicit --mode wins
    full = np.load(tmp_path / "full" / "audio.npy")
    assert json.loads((tmp_path / "full" / "meta.json").read_text())["mode"] == "full"
    assert not np.allclose(full[0], got[0], atol=1e-3)


def test_ids_file_with_bom_and_spaces_is_read_as_catalogs_are(tmp_path):
    from data import load_catalog
    emb = _write_world(tmp_path)
    catalog = load_catalog(tmp_path / "catalog.csv")
    ids = (tmp_path / "e.ids.txt").read_text().splitlines()
    (tmp_path / "e.ids.txt").write_bytes(b"\xef\xbb\xbf" + "".join(f" {i}\t\n" for i in ids).encode())
    x = embeddings.song_embeddings(str(tmp_path / "e.npy"), catalog)
    assert np.array_equal(x, emb)  # every song found, in catalog order


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Eight songs of 1-8 s (so a batch of 8 pads most of them), with genre, language and split
    columns and a favourites log; a full and a chunked (2 s windows) artifact."""
    d = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(4)
    os.makedirs(d / "audio")
    rows = []
    for i in range(8):
        t = np.arange(int((1 + i) * 16000)) / 16000
        x = 0.3 * np.sin(2 * np.pi * (180 + 70 * i + 50 * t) * t) * (1 + np.sin(2 * np.pi * (0.4 + 0.3 * i) * t))
        sf.write(d / "audio" / f"s{i}.wav", (x + 0.02 * rng.standard_normal(len(t))).astype(np.float32), 16000)
        rows.append(f"s{i},audio/s{i}.wav,song {i},artist {i % 3},la la {i},{'rock' if i % 2 else 'jazz'},en,"
                    f"{'test' if i in (3, 6) else 'train'}\n")
    (d / "catalog.csv").write_text("song_id,audio,title,artists,lyrics,genre,language,split\n" + "".join(rows))
    (d / "fav.csv").write_text("user_id,song_id,timestamp\n" + "".join(f"u0,s{i},{i}\n" for i in range(5)))
    return {"dir": d, "catalog": str(d / "catalog.csv"), "fav": str(d / "fav.csv"),
            "full": save_tiny_artifact(d / "full"),
            "chunked": save_tiny_artifact(d / "chunked", embed_mode="chunked", chunk_seconds=2.0)}


def _hand_windows(model, mel, chunk_frames):
    """A song's un-normalized window projections, one window a forward pass, no padding anywhere."""
    starts = [s for s in range(0, len(mel), chunk_frames) if s == 0 or len(mel) - s >= MIN_FRAMES]
    with torch.no_grad():
        return torch.stack([model.encode_audio(mel[s:s + chunk_frames][None], normalize=False)[0] for s in starts])


@pytest.mark.parametrize("which", ["full", "chunked"])
def test_embeddings_are_deterministic_across_runs_batch_sizes_and_files(world, which):
    """The same artifact and audio give the same embedding within 1e-5: loaded twice, at batch
    size 1 and padded in a batch of 8, from the catalog and from the bare files; in the chunked
    artifact's own setting, each song is the mean of its own 2 s windows."""
    catalog = load_catalog(world["catalog"])
    runs = []
    for batch_size in (1, 8, 8):  # 8: one padded batch; the last run a fresh load of the artifact
        model, tokenizer = htcl.load_artifact(world[which])
        runs.append(embeddings.embed_catalog(model, tokenizer, catalog, kinds=("audio", "text", "fused"),
                                             batch_size=batch_size))
    for kind in ("audio", "text", "fused"):
        np.testing.assert_allclose(runs[0][kind], runs[1][kind], atol=1e-5)
        np.testing.assert_allclose(runs[1][kind], runs[2][kind], atol=1e-5)
    files = [s.audio for s in catalog.songs]
    for batch_size in (1, 8):
        np.testing.assert_allclose(evsearch.embed_audio_files(model, files, batch_size=batch_size),
                                   runs[0]["audio"], atol=1e-5)
    chunk = seconds_to_frames(2.0) if which == "chunked" else 10 ** 6
    for r, path in enumerate(files):
        want = F.normalize(_hand_windows(model, song_mel(path), chunk).mean(0), dim=0).numpy()
        np.testing.assert_allclose(runs[0]["audio"][r], want, atol=1e-5)
    if which == "chunked":  # the setting matters: songs longer than two windows differ from whole songs
        whole = embeddings.embed_catalog(model, tokenizer, catalog, mode="full")["audio"]
        assert np.abs(whole[7] - runs[0]["audio"][7]).max() > 1e-3


def test_chunked_fused_embedding_fuses_the_mean_of_the_windows_not_their_sum(world):
    """Bug checked (made by hand): _encode_chunked returned the sum of the window projections.
    The audio embedding is immune (L2 removes the scale); the fused one is not."""
    model, tokenizer = htcl.load_artifact(world["chunked"])
    catalog = load_catalog(world["catalog"])
    got = embeddings.embed_catalog(model, tokenizer, catalog, kinds=("fused",), batch_size=3)["fused"]
    collate = Collator(tokenizer)
    for r in (5, 7):  # 6 s and 8 s: 3 and 4 windows
        windows = _hand_windows(model, song_mel(catalog[r].audio), seconds_to_frames(2.0))
        assert len(windows) >= 3
        tokens = collate([{"mel": song_mel(catalog[r].audio), "text": catalog[r].text}])["tokens"]
        with torch.no_grad():
            text = model.encode_text(tokens, normalize=False)
            want = model.fuse(windows.mean(0, keepdim=True), text)[0].numpy()
            summed = model.fuse(windows.sum(0, keepdim=True), text)[0].numpy()
        np.testing.assert_allclose(got[r], want, atol=1e-5)
        assert np.abs(summed - want).max() > 1e-3  # the test can tell the two apart


def _stale_folder(world, tmp_path):
    art = save_tiny_artifact(tmp_path / "art", seed=5)  # not the weights of world's artifacts (seed 0)
    emb = str(tmp_path / "emb")
    ev.main(["embed", "--artifact", art, "--catalog", world["catalog"], "--out", emb, "--text"])
    return art, emb


@pytest.mark.parametrize("command", ["matching", "report", "retrieval", "probe"])
def test_every_command_refuses_embeddings_of_an_artifact_retrained_since(world, tmp_path, command):
    art, emb = _stale_folder(world, tmp_path)
    extra = {"matching": ["--favourites", world["fav"], "--triggers", "2"],
             "report": ["--out", str(tmp_path / "report"), "--probe_seeds", "1", "--ranking_seeds", "0"],
             "retrieval": ["--tag", "genre", "--k", "3"], "probe": ["--seeds", "1", "--epochs", "1"]}[command]
    argv = [command, "--catalog", world["catalog"], "--emb", emb, *extra]
    ev.main(argv)  # fresh: fine
    save_tiny_artifact(tmp_path / "art", seed=1)  # retrained at the same path
    with pytest.raises(ValueError, match=r"emb \(embedded\) and the artifact now at .*art were made by different "
                                         r"weights: .*sha256 [0-9a-f]{12}.*sha256 [0-9a-f]{12}"):
        ev.main(argv)


def test_retrieval_refuses_a_text_tower_other_than_the_songs_model(world, tmp_path):
    art, emb = _stale_folder(world, tmp_path)
    with pytest.raises(ValueError, match=r"--emb .*emb and the T2M text tower .*full were made by different"):
        ev.main(["retrieval", "--catalog", world["catalog"], "--emb", emb, "--tag", "genre", "--k", "3",
                 "--artifact", world["full"]])
    ev.main(["retrieval", "--catalog", world["catalog"], "--emb", emb, "--tag", "genre", "--k", "3",
             "--artifact", art])  # its own tower: fine


def test_an_explicit_mode_other_than_the_saved_embeddings_is_refused(world, tmp_path):
    _, emb = _stale_folder(world, tmp_path)
    with pytest.raises(ValueError, match=r"--mode chunked asks for chunked embeddings, but .*emb holds full"):
        ev.main(["matching", "--catalog", world["catalog"], "--emb", emb, "--mode", "chunked",
                 "--favourites", world["fav"], "--triggers", "2"])


def test_check_provenance_names_both_sides_and_the_setting():
    a = {"artifact": "/x", "artifact_sha256": "a" * 64, "embed_mode": "chunked", "chunk_seconds": 10.0}
    embeddings.check_provenance(a, dict(a), "left", "right")
    with pytest.raises(ValueError, match=r"^left and right differ in chunk_seconds: 10.0 \(left\) vs 2.0 \(right\)"):
        embeddings.check_provenance(a, {**a, "chunk_seconds": 2.0}, "left", "right")
    with pytest.raises(ValueError, match=r"^left and right were made by different weights: left by /x \(sha256 a{12}"):
        embeddings.check_provenance(a, {**a, "artifact_sha256": "b" * 64}, "left", "right")


@pytest.mark.parametrize("template", ["{genre}", "{0}", "{value"])
def test_retrieval_refuses_a_template_it_cannot_fill_before_any_work(world, template):
    with pytest.raises(ValueError, match=r"--template .*: .*; it may use \{value\} and \{column\} only"):
        ev.main(["retrieval", "--catalog", world["catalog"], "--emb", world["full"], "--tag", "genre",
                 "--template", template])


def test_embed_without_a_kind_removes_that_kind_of_an_earlier_run(world, tmp_path):
    """An earlier run's text.npy beside new audio.npy would be read as the new model's text."""
    emb = str(tmp_path / "emb")
    ev.main(["embed", "--artifact", world["full"], "--catalog", world["catalog"], "--out", emb, "--text"])
    assert os.path.exists(os.path.join(emb, "text.npy"))
    ev.main(["embed", "--artifact", world["chunked"], "--catalog", world["catalog"], "--out", emb])
    assert not os.path.exists(os.path.join(emb, "text.npy"))
    assert embeddings.read_provenance(emb)["kinds"] == ["audio"]
    np.save(os.path.join(emb, "text.npy"), np.zeros((8, 8), dtype=np.float32))  # put back by hand
    with pytest.raises(ValueError, match=r"emb: its provenance.json records kinds audio, not text; re-run embed "
                                         r"with --text"):
        ev.main(["probe", "--catalog", world["catalog"], "--emb", emb, "--kind", "text", "--seeds", "1"])
