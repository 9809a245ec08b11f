"""Tests of evals/embeddings.py: embedding files aligned to the catalog by song_id (ids.txt, BOM
and spaces), `evaluate.py embed` (normalized, batch-independent, chunked 10 s windows, an artifact's
own chunk length), and labelled pair files for Figure 2.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_embeddings.py
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import evaluate as ev
from evals import embeddings
import model as htcl

from tests.helpers import _write_world


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
