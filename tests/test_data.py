"""Tests of data.py (Sec. 3.1.3 inputs): the log-mel front end against transformers' spectrogram,
catalogs, pair and favourite files and their errors, co-occurrence mining, the mel cache (shards,
resume, kill -9, bad audio of every kind, max_bad), the datasets and collator, the CrossMuSim
samplers, and that caches and paths are read as data, never run.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_data.py
"""
import ast
import csv
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

import data
from evals import embeddings
from data import AudioError, CatalogError

from tests.helpers import ROOT, SAMPLE, TINY_BERT, _write_world, tone, write_catalog


def reference_log_mel(x):
    """numpy reference: transformers' spectrogram with the same window, mel bank and power,
    then librosa-style power_to_db(ref=max, top_db=80) and per-song standardization."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function
    fb = mel_filter_bank(1025, 128, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
    S = spectrogram(x.astype(np.float64), window_function(2048, "hann", periodic=True), 2048, 1536,
                    power=2.0, center=True, pad_mode="constant", mel_filters=fb, mel_floor=1e-10,
                    dtype=np.float64).T
    db = 10 * np.log10(np.maximum(S, 1e-10)) - 10 * np.log10(max(S.max(), 1e-10))
    db = np.maximum(db, db.max() - 80.0)
    return (db - db.mean()) / (db.std() + 1e-8)


def test_log_mel_matches_transformers_spectrogram():
    rng = np.random.default_rng(1)
    t = np.arange(10 * 16000) / 16000
    x = (0.4 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 0.5 * t))
         + 0.05 * rng.standard_normal(t.size) * np.exp(-0.3 * t)).astype(np.float32)
    ours = data.log_mel(torch.from_numpy(x), 16000)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference_log_mel(x), atol=1e-4)


def test_log_mel_resamples_other_rates_first():
    import soxr
    x = tone(3, sr=22050, freq=1000.0)
    ref = reference_log_mel(soxr.resample(x, 22050, 16000))
    np.testing.assert_allclose(data.log_mel(torch.from_numpy(x), 22050).numpy(), ref, atol=1e-4)


def test_silent_and_nan_input_give_finite_output():
    silent = data.log_mel(torch.zeros(5 * 16000), 16000)
    assert torch.equal(silent, torch.zeros_like(silent))
    x = torch.from_numpy(tone(5))
    x[1000:1100] = float("nan")
    x[5] = float("inf")
    with pytest.warns(UserWarning, match="101 non-finite"):
        out = data.log_mel(x, 16000)
    assert torch.isfinite(out).all() and out.std() > 0.5


def test_load_audio_downmixes_stereo_and_resamples_44k(tmp_path):
    left, right = tone(2, sr=44100, amp=0.6), tone(2, sr=44100, amp=0.2)
    sf.write(tmp_path / "st.wav", np.stack([left, right], 1), 44100, subtype="FLOAT")
    x = data.load_audio(str(tmp_path / "st.wav"))
    assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 32000) <= 1
    expected = tone(2, sr=16000, amp=0.4)  # mean of the channels, sampled at 16 kHz
    np.testing.assert_allclose(x[2000:30000], expected[2000:30000], atol=2e-3)


def test_long_file_reads_only_the_first_max_seconds(tmp_path, monkeypatch):
    x = np.random.default_rng(2).uniform(-0.5, 0.5, 10 * 8000).astype(np.float32)
    sf.write(tmp_path / "long.wav", x, 8000, subtype="FLOAT")
    requested, read = [], sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        requested.append(frames)
        return read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    y = data.load_audio(str(tmp_path / "long.wav"), max_seconds=2)
    assert requested == [2 * 8000]  # a bounded read, not the whole file
    assert len(y) == 2 * 16000


def test_short_song_is_padded_to_min_frames_and_long_song_clipped_to_1251(tmp_path):
    sf.write(tmp_path / "short.wav", tone(0.5), 16000)
    sf.write(tmp_path / "long.wav", tone(125, sr=8000), 8000)
    assert data.song_mel(str(tmp_path / "short.wav")).shape == (data.MIN_FRAMES, 128)
    assert data.song_mel(str(tmp_path / "long.wav")).shape == (1251, 128)


def test_catalog_reads_csv_and_jsonl_and_builds_text(tmp_path):
    p = write_catalog(tmp_path / "c.csv", [["a", "x/a.wav", "T", "Ar", "la\nla"], ["b", "/abs/b.wav", "", "B", ""]],
                      header=("song_id", "audio", "title", "artists", "lyrics", "genre")[:5])
    cat = data.load_catalog(p)
    assert len(cat) == 2 and cat.index == {"a": 0, "b": 1}
    assert cat[0].audio == os.path.join(str(tmp_path), "x", "a.wav") and cat[1].audio == "/abs/b.wav"
    assert cat[0].text == "title: T; artists: Ar; lyrics: la\nla"
    with open(tmp_path / "c.jsonl", "w") as f:
        f.write(json.dumps({"song_id": "a", "audio": "a.wav", "title": "T", "artists": "", "lyrics": "", "genre": "rock"}) + "\n")
    cat = data.load_catalog(str(tmp_path / "c.jsonl"))
    assert cat[0].labels == {"genre": "rock"} and cat.rows_with("genre", "rock") == [0]


@pytest.mark.parametrize("case", ["missing_column", "duplicate", "empty_text", "non_utf8", "bad_json"])
def test_catalog_errors_name_file_and_row(tmp_path, case):
    p = str(tmp_path / "cat.csv")
    if case == "missing_column":
        write_catalog(p, [["a", "a.wav", "T", "A"]], header=("song_id", "audio", "title", "artists"))
        expect = ["cat.csv", "line 1", "lyrics"]
    elif case == "duplicate":
        write_catalog(p, [["a", "a.wav", "T", "", ""], ["b", "b.wav", "T", "", ""], ["a", "c.wav", "T", "", ""]])
        expect = ["cat.csv", "'a'", "row 0", "row 2", "song_id"]
    elif case == "empty_text":
        write_catalog(p, [["a", "a.wav", "T", "", ""], ["b", "b.wav", " ", "", ""]])
        expect = ["cat.csv", "row 1", "line 3", "title"]
    elif case == "non_utf8":
        with open(p, "wb") as f:
            f.write(b"song_id,audio,title,artists,lyrics\na,a.wav,T,,\nb,b.wav,Caf\xe9,,\n")
        expect = ["cat.csv", "line 3", "byte offset 58"]  # 35 header + 12 row bytes + len("b,b.wav,Caf")
    else:
        p = str(tmp_path / "cat.jsonl")
        with open(p, "w") as f:
            f.write('{"song_id": "a", "audio": "a.wav", "title": "T", "artists": "", "lyrics": ""}\n{"song_id": "b",\n')
        expect = ["cat.jsonl", "line 2", "malformed JSON"]
    with pytest.raises(CatalogError) as e:
        data.load_catalog(p)
    for s in expect:
        assert s in str(e.value), (s, str(e.value))


def test_split_rows_uses_split_column_or_seeded_90_10(tmp_path):
    rows = [[f"s{i}", f"{i}.wav", "t", "", ""] for i in range(50)]
    cat = data.load_catalog(write_catalog(tmp_path / "c.csv", rows))
    train, val = data.split_rows(cat, "train"), data.split_rows(cat, "val")
    assert len(val) == 5 and sorted(train + val) == list(range(50))
    assert data.split_rows(cat, "test") == [] and data.split_rows(cat, "val") == val
    cat = data.load_catalog(write_catalog(tmp_path / "d.csv", [r + [("train", "val", "test")[i % 3]] for i, r in enumerate(rows)],
                                          header=("song_id", "audio", "title", "artists", "lyrics", "split")))
    assert data.split_rows(cat, "test") == list(range(2, 50, 3))


def test_load_pairs_drops_unknown_ids_with_a_count_and_raises_when_none_left(tmp_path):
    cat = data.load_catalog(write_catalog(tmp_path / "c.csv", [[s, f"{s}.wav", "t", "", ""] for s in "abc"]))
    p = tmp_path / "pairs.csv"
    p.write_text("trigger_song_id,rec_song_id\na,b\na,zz\nyy,c\nc,a\n")
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 rows.*line 3: 'zz'.*line 4: 'yy'"):
        assert data.load_pairs(str(p), cat) == [(0, 1), (2, 0)]
    p.write_text("trigger_song_id,rec_song_id\nzz,a\n")
    with pytest.raises(CatalogError, match="pairs.csv: no usable pairs"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.load_pairs(str(p), cat)
    p.write_text("trigger,rec_song_id\na,b\n")
    with pytest.raises(CatalogError, match="pairs.csv: line 1.*trigger_song_id"):
        data.load_pairs(str(p), cat)


def test_favourites_sorted_by_user_then_time_and_bad_timestamp_named(tmp_path):
    cat = data.load_catalog(write_catalog(tmp_path / "c.csv", [[s, f"{s}.wav", "t", "", ""] for s in "abc"]))
    p = tmp_path / "fav.csv"
    p.write_text("user_id,song_id,timestamp\nu2,a,5\nu1,c,20\nu1,b,2024-01-01T00:00:00\nu1,zz,1\nu1,a,10\n")
    with pytest.warns(UserWarning, match="dropped 1 of 5"):
        favs = data.load_favourites(str(p), cat)
    assert [(u, r) for u, r, _ in favs] == [("u1", 0), ("u1", 2), ("u1", 1), ("u2", 0)]
    p.write_text("user_id,song_id,timestamp\nu1,a,1\nu1,b,yesterday\n")
    with pytest.raises(CatalogError, match="fav.csv: line 3 .*timestamp"):
        data.load_favourites(str(p), cat)


# Checked by making its bug by hand: a per-user cap that keeps nothing, or one pair too few.
def test_cooccurrence_pairs_match_hand_worked_log():
    favs = [("u1", 0, 1.0), ("u1", 1, 2.0), ("u1", 2, 3.0), ("u1", 3, 4.0),
            ("u2", 1, 1.0), ("u2", 0, 2.0), ("u2", 4, 3.0),
            ("u3", 5, 1.0), ("u3", 5, 2.0), ("u3", 6, 3.0)]
    # window 3: u1 [0,1,2,3] -> 01 02 12 13 23; u2 [1,0,4] -> 10 (= 01, dropped) 14 04; u3 [5,5,6] -> 56 (55 is a self pair)
    assert data.mine_cooccurrence_pairs(favs, window=3) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (1, 4), (0, 4), (5, 6)]
    # window 2 = consecutive favourites only
    assert data.mine_cooccurrence_pairs(favs, window=2) == [(0, 1), (1, 2), (2, 3), (0, 4), (5, 6)]
    # Per-user cap: users whose pairs do not overlap, so the cap is the only thing that removes pairs.
    # window 3: u1 [0,1,2,3] -> 5 pairs, u2 [4,5,6] -> 3 pairs, u3 [7,8] -> 1 pair.
    disjoint = [("u1", r, float(t)) for t, r in enumerate([0, 1, 2, 3])] + \
               [("u2", r, float(t)) for t, r in enumerate([4, 5, 6])] + [("u3", 7, 0.0), ("u3", 8, 1.0)]
    full = data.mine_cooccurrence_pairs(disjoint, window=3)
    by_user = {"u1": full[:5], "u2": full[5:8], "u3": full[8:]}
    assert by_user["u3"] == [(7, 8)]
    for cap in (1, 2, 3):
        capped = data.mine_cooccurrence_pairs(disjoint, window=3, max_pairs_per_user=cap)
        for user, pairs in by_user.items():
            mine = [p for p in capped if p in pairs]
            # exactly min(cap, the user's pairs) remain, each a real pair, in the user's time order
            assert len(mine) == min(cap, len(pairs)) and mine == [p for p in pairs if p in mine], (cap, user, capped)
        assert len(capped) == sum(min(cap, len(p)) for p in by_user.values())
    assert data.mine_cooccurrence_pairs(disjoint, window=3, max_pairs_per_user=5) == full  # cap not reached
    assert data.mine_cooccurrence_pairs(disjoint, window=3, max_pairs_per_user=2) == \
        data.mine_cooccurrence_pairs(disjoint, window=3, max_pairs_per_user=2)  # seeded


# Checked by making its bug by hand: SongDataset's "row" = index in the dataset, not the catalog row.
def test_prepare_in_two_shards_round_trips_resumes_and_reports_bad_files(tmp_path, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(3)
    sf.write(audio / "a.wav", tone(3.0), 16000)
    sf.write(audio / "b.flac", np.stack([tone(2.0, sr=22050), tone(2.0, sr=22050, freq=660)], 1), 22050)
    sf.write(audio / "c.wav", tone(0.4, freq=200), 16000)  # shorter than MIN_FRAMES
    (audio / "d.wav").write_bytes(b"RIFF not really a wav file")
    sf.write(audio / "e.wav", rng.uniform(-0.3, 0.3, 4 * 16000).astype(np.float32), 16000)
    rows = [[s, f"audio/{f}", f"song {s}", "artist", ""] for s, f in
            zip("abcde", ["a.wav", "b.flac", "c.wav", "d.wav", "e.wav"])]
    cat_path = write_catalog(tmp_path / "cat.csv", rows)
    cat, cache_dir = data.load_catalog(cat_path), str(tmp_path / "cache")

    data.main(["prepare", "--catalog", cat_path, "--cache", cache_dir, "--shard", "0/2"])  # rows 0-1
    with pytest.raises(CatalogError, match=r"shard 1/2 missing: .*--shard 1/2"):
        data.MelCache.open(cache_dir, cat)
    counts = data.prepare(cat_path, cache_dir, shard=(1, 2), num_workers=2, max_bad=0.5)  # rows 2-4, d fails
    assert counts == {**counts, "rows": 3, "computed": 2, "failed": 1, "kept": 0}
    with open(os.path.join(cache_dir, "bad-00001-of-00002.csv")) as f:
        bad = list(csv.DictReader(f))
    assert [b["song_id"] for b in bad] == ["d"] and bad[0]["path"].endswith("d.wav")

    cache = data.MelCache.open(cache_dir, cat)
    assert [cache.has(r) for r in range(5)] == [True, True, True, False, True]
    for r in (0, 1, 2, 4):
        np.testing.assert_allclose(cache.mel(r).numpy(), data.song_mel(cat[r].audio).numpy(), atol=5e-3)
    assert cache.mel(2).shape == (data.MIN_FRAMES, 128)

    again = data.prepare(cat_path, cache_dir, shard=(1, 2), max_bad=0.5)  # done rows are kept, the failure is retried
    assert (again["kept"], again["computed"], again["failed"]) == (2, 0, 1)
    assert "1 failed" in capsys.readouterr().out

    # a cache built for another catalog is refused
    other = data.load_catalog(write_catalog(tmp_path / "other.csv", rows[:4] + [["e", "audio/x.wav", "t", "", ""]]))
    with pytest.raises(CatalogError, match="another catalog"):
        data.MelCache.open(cache_dir, other)

    # the datasets skip the failed song and its pairs; the collator batches what is left
    from transformers import BertTokenizer
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "title", "artists", "lyrics", ":", ";", "song", "artist"] + list("abcde"))})
    collate = data.Collator(tok)
    with pytest.warns(UserWarning, match="skipping 1 songs"):
        songs = data.SongDataset(cat, list(range(5)), cache)
    assert len(songs) == 4
    batch = collate([songs[k] for k in range(4)])
    assert batch["mel"].shape == (4, 1 + 4 * 16000 // 1536, 128)  # e.wav, 4 s, is the longest
    assert batch["row"].tolist() == [0, 1, 2, 4]  # catalog rows, the failed d (row 3) left out
    with pytest.warns(UserWarning):
        pairs = data.PairDataset(cat, [(0, 1), (3, 0), (4, 2)], cache)
    assert pairs.pairs == [(0, 1), (4, 2)]
    assert torch.equal(pairs[1]["rec_mel"], cache.mel(2))
    no_cache = data.SongDataset(cat, [0])
    np.testing.assert_allclose(no_cache[0]["mel"].numpy(), cache.mel(0).numpy(), atol=5e-3)


def test_collator_tokenizes_exactly_as_the_tokenizer_call():
    """Collator.tokenize drives the Rust backend directly; the reference is the wrapper's own call."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_BERT)
    catalog = data.load_catalog(os.path.join(SAMPLE, "catalog.csv"))
    texts = [catalog[r].text for r in range(40)]
    long = [" ".join([t] * 40) for t in texts[:5]]  # > 512 tokens: truncated, [SEP] kept
    for max_len, batch in ((512, texts), (512, long + texts[:3]), (16, texts[:7]), (512, texts[:1])):
        ours = data.Collator(tok, max_len).tokenize(batch)
        ref = tok(batch, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        assert set(ours) == set(ref) == set(tok.model_input_names)
        for k in ref:
            assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), (max_len, k)
    assert ours["input_ids"].shape[1] < 512  # one text: no padding at all
    assert data.Collator(tok, 512).tokenize(long)["input_ids"].shape == (5, 512)
    left = AutoTokenizer.from_pretrained(TINY_BERT, padding_side="left", truncation_side="left")
    ref = left(long[:1] + texts[:3], padding="longest", truncation=True, max_length=64, return_tensors="pt")
    ours = data.Collator(left, 64).tokenize(long[:1] + texts[:3])
    assert all(torch.equal(ours[k], ref[k]) for k in ref) and ref["attention_mask"][1, 0] == 0
    # the caller's tokenizer is not reconfigured: its own calls still pad and truncate as asked
    assert tok(long[0])["input_ids"].__len__() > 512 and tok.backend_tokenizer.truncation is None


def test_collator_pads_mels_with_masks_and_tokenizes_texts():
    from transformers import BertTokenizer
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", "y"])})
    collate = data.Collator(tok, max_text_length=6)
    mels = [torch.randn(n, 128) for n in (20, 31, 5)]
    batch = collate([{"mel": m, "text": t, "row": r} for m, t, r in zip(mels, ["x", "x y x y x y x y", "y"], [7, 8, 9])])
    assert set(batch) == {"mel", "padding_mask", "tokens", "row"}
    assert batch["mel"].shape == (3, 31, 128) and batch["mel"].dtype == torch.float32
    assert batch["padding_mask"].sum(1).tolist() == [11, 0, 26] and batch["padding_mask"][0, 19:21].tolist() == [False, True]
    assert torch.equal(batch["mel"][2, :5], mels[2]) and batch["mel"][2, 5:].abs().sum() == 0
    assert batch["tokens"]["input_ids"].shape == (3, 6)  # the long text is truncated at 6
    assert batch["tokens"]["attention_mask"].sum(1).tolist() == [3, 6, 3]
    assert batch["row"].dtype == torch.long and batch["row"].tolist() == [7, 8, 9]
    short = collate([{"trig_mel": torch.randn(4, 128), "rec_mel": torch.randn(6, 128), "trig_text": "x",
                      "rec_text": "y", "trig_row": 0, "rec_row": 1}])
    assert set(short) == {"trig_mel", "trig_padding_mask", "rec_mel", "rec_padding_mask",
                          "trig_tokens", "rec_tokens", "trig_row", "rec_row"}
    assert short["trig_mel"].shape == (1, data.MIN_FRAMES, 128) and short["trig_padding_mask"].sum() == data.MIN_FRAMES - 4


def test_cli_mine_pairs_writes_song_ids_and_typos_fail(tmp_path):
    write_catalog(tmp_path / "c.csv", [[s, f"{s}.wav", "t", "", "", sp] for s, sp in zip("abcde", ["train"] * 4 + ["test"])],
                  header=("song_id", "audio", "title", "artists", "lyrics", "split"))
    (tmp_path / "fav.csv").write_text("user_id,song_id,timestamp\nu1,a,1\nu1,b,2\nu1,e,3\nu1,c,4\nu2,d,1\nu2,a,2\n")
    args = ["mine-pairs", "--favourites", str(tmp_path / "fav.csv"), "--catalog", str(tmp_path / "c.csv"),
            "--out", str(tmp_path / "p.csv"), "--window", "3"]
    data.main(args)
    # u1 a b e c: ab ae be bc ec -> without test song e: ab bc; u2 d a: da
    assert (tmp_path / "p.csv").read_text() == "trigger_song_id,rec_song_id\na,b\nb,c\nd,a\n"
    for bad in (["mine-pair"] + args[1:], args + ["--windw", "2"], ["prepare", "--catalog", "c", "--cache", "d", "--shard", "2/2"]):
        with pytest.raises(SystemExit):
            data.main(bad)


def tones(seconds, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1500 * t)).astype(np.float32)


def music(seconds=3.0, sr=16000):
    """Tones over broadband noise: every mel bin well above 8-bit quantization noise (-48 dBFS)."""
    noise = np.random.default_rng(1).uniform(-0.2, 0.2, int(seconds * sr)).astype(np.float32)
    return 0.6 * (tones(seconds, sr) + noise)


def read_report(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tokenizer():
    from transformers import BertTokenizer
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "title", "artists", "lyrics", ":", ";"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words + list("abcdefghijklmnopqrstuvwxyz"))})


# Bad audio, each kind through song_mel and through prepare. A case writes its file to `path` (or
# leaves it missing) and says what must happen:
#   ("bad", text): song_mel raises, prepare skips the song and reports it with `text` in the reason
#   ("ok", check): song_mel and prepare both give a finite mel; check(mel, tmp_path) compares it
def _wav_bytes(tmp_path, x, sr=16000, subtype="PCM_16"):
    sf.write(tmp_path / "src.wav", x, sr, subtype=subtype)
    return (tmp_path / "src.wav").read_bytes()


def _flac_bytes(tmp_path):
    sf.write(tmp_path / "src.flac", music(3.0), 16000)
    return (tmp_path / "src.flac").read_bytes()


def _close_to(reference, max_abs=None, mean_abs=None, skip_edge_frames=0):
    """check(): the mel is near the reference waveform's (16 kHz, PCM_16 or float)."""
    def check(mel, tmp_path):
        ref = data.log_mel(torch.from_numpy(reference), 16000).numpy()
        assert mel.shape == ref.shape
        err = np.abs(mel.numpy() - ref)
        if skip_edge_frames:  # the resampler's filter transient sits in the first/last frame
            err = err[skip_edge_frames:-skip_edge_frames]
        if max_abs is not None:
            assert err.max() < max_abs, err.max()
        if mean_abs is not None:
            assert err.mean() < mean_abs, err.mean()
    return check


def _silent(mel, tmp_path):
    assert torch.count_nonzero(mel) == 0  # the -80 dB floor everywhere, standardized to 0, not NaN


def _nan_inf(mel, tmp_path):
    clean = music(3.0)
    clean[[100, 5000, 20000]] = 0.0  # the non-finite samples become 0
    _close_to(clean, max_abs=1e-4)(mel, tmp_path)


def _one_second(mel, tmp_path):
    assert mel.shape == (data.MIN_FRAMES, 128)  # 1 s = 11 frames, padded with silence to 17


def _truncated_data(mel, tmp_path):
    assert mel.shape == (1 + 32000 // data.HOP_LENGTH, 128)  # the 2 s that are there


def _write_case(case, path, tmp_path):
    """Write the file for `case` at `path`; return its expectation."""
    if case == "truncated_header":
        path.write_bytes(_wav_bytes(tmp_path, music(1.0))[:30])
        return "bad", "No 'data' chunk"
    if case == "truncated_flac":
        b = _flac_bytes(tmp_path)
        path.write_bytes(b[: len(b) // 3])
        return "bad", "flac decoder lost sync"
    if case == "corrupt_flac":  # 2000 zeroed bytes in the middle of the stream
        b = bytearray(_flac_bytes(tmp_path))
        b[len(b) // 2: len(b) // 2 + 2000] = bytes(2000)
        path.write_bytes(bytes(b))
        return "bad", "flac decoder"
    if case == "truncated_wav_data":  # header promises 4 s, 2 s present: the rest is just absent
        b = _wav_bytes(tmp_path, music(4.0))
        path.write_bytes(b[: 44 + 2 * 32000])
        return "ok", _truncated_data
    if case == "header_only_wav":
        path.write_bytes(_wav_bytes(tmp_path, music(1.0))[:44])
        return "bad", "no audio frames"
    if case == "zero_length":
        path.write_bytes(b"")
        return "bad", "empty file (0 bytes)"
    if case == "missing":
        return "bad", "FileNotFoundError"
    if case == "directory":
        path.mkdir()
        return "bad", "not a regular file"
    if case == "unreadable_chmod":
        if os.geteuid() == 0:
            pytest.skip("running as root, which reads a chmod 000 file anyway; 'unreadable_simulated' covers it")
        sf.write(path, music(1.0), 16000, format="WAV")
        os.chmod(path, 0)
        return "bad", "PermissionError"
    if case == "random_bytes_xyz":  # no 0xFF byte, so no MP3 frame sync can be found by chance
        path.write_bytes(bytes(np.random.default_rng(1).integers(0, 255, 5000).astype(np.uint8)))
        return "bad", "Format not recognised"
    if case == "text_as_wav":
        path.write_text("song_id,title\nnot,audio\n" * 20)
        return "bad", "Format not recognised"
    if case == "silent":
        sf.write(path, np.zeros(3 * 16000, np.float32), 16000, format="WAV")
        return "ok", _silent
    if case == "nan_inf":
        x = music(3.0)
        x[[100, 5000, 20000]] = [np.nan, np.inf, -np.inf]
        sf.write(path, x, 16000, format="WAV", subtype="FLOAT")
        return "ok", _nan_inf
    if case in ("pcm_u8", "pcm_24", "float32"):
        subtype = {"pcm_u8": "PCM_U8", "pcm_24": "PCM_24", "float32": "FLOAT"}[case]
        sf.write(path, music(3.0), 16000, format="WAV", subtype=subtype)
        sf.write(tmp_path / "ref16.wav", music(3.0), 16000, subtype="PCM_16")
        ref16 = data.load_audio(str(tmp_path / "ref16.wav"))
        # 8-bit has its own noise floor 48 dB down, so only the average may move; 24-bit and float
        # differ from 16-bit by 16-bit's rounding alone
        return "ok", _close_to(ref16, mean_abs=0.03) if case == "pcm_u8" else _close_to(ref16, max_abs=0.005)
    if case in ("stereo", "six_channels"):
        ch = 2 if case == "stereo" else 6
        gains = np.linspace(0.5, 1.5, ch, dtype=np.float32)  # mean gain 1: the downmix is music()
        sf.write(path, music(3.0)[:, None] * gains, 16000, format="WAV", subtype="FLOAT")
        return "ok", _close_to(music(3.0), max_abs=1e-3)
    if case in ("8khz", "48khz"):
        sr = 8000 if case == "8khz" else 48000
        sf.write(path, tones(3.0, sr), sr, format="WAV", subtype="FLOAT")  # both tones < 4 kHz
        return "ok", _close_to(tones(3.0), max_abs=0.02, skip_edge_frames=1)
    if case == "one_second":
        sf.write(path, music(1.0), 16000, format="WAV")
        return "ok", _one_second
    raise AssertionError(case)


AUDIO_CASES = ["truncated_header", "truncated_flac", "corrupt_flac", "truncated_wav_data", "header_only_wav",
               "zero_length", "missing", "directory", "unreadable_chmod", "unreadable_simulated",
               "random_bytes_xyz", "text_as_wav", "silent", "nan_inf", "pcm_u8", "pcm_24", "float32",
               "stereo", "six_channels", "8khz", "48khz", "one_second"]


@pytest.mark.parametrize("case", AUDIO_CASES)
def test_bad_audio_is_skipped_and_reported_and_odd_audio_decodes(tmp_path, monkeypatch, case):
    ext = {"random_bytes_xyz": ".xyz", "truncated_flac": ".flac", "corrupt_flac": ".flac"}.get(case, ".wav")
    path = tmp_path / f"x{ext}"
    if case == "unreadable_simulated":
        # as root a chmod 000 file stays readable, so make open() of this one path fail the way it
        # does for a normal user; this checks that data.py opens the file itself (not libsndfile)
        # and that the OS's PermissionError becomes a reported skip, not a crash
        sf.write(path, music(1.0), 16000, format="WAV")
        real_open = open

        def open_denied(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(data, "open", open_denied, raising=False)
        kind, expect = "bad", "PermissionError"
    else:
        kind, expect = _write_case(case, path, tmp_path)

    # song_mel directly
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "bad":
            with pytest.raises((AudioError, OSError)) as e:
                data.song_mel(str(path))
            assert expect in f"{type(e.value).__name__}: {e.value}"
        else:
            mel = data.song_mel(str(path))
            assert torch.isfinite(mel).all()
            expect(mel, tmp_path)
    if case == "nan_inf":
        assert any("3 non-finite samples replaced with 0" in str(w.message) for w in caught)

    # through prepare: a good song and this one; the run goes on whatever this one is
    sf.write(tmp_path / "good.wav", music(2.0), 16000)
    cat_path = write_catalog(tmp_path / "cat.csv", [["good", "good.wav", "Good", "A", ""],
                                                    ["x", path.name, "X", "B", ""]])
    cache_dir = str(tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the NaN warning, already checked above
        counts = data.prepare(cat_path, cache_dir, max_bad=1.0)
    cat = data.load_catalog(cat_path)
    report = os.path.join(cache_dir, "bad-00000-of-00001.csv")
    if kind == "bad":
        assert (counts["computed"], counts["failed"], counts["report"]) == (1, 1, report)
        (row,) = read_report(report)
        assert row["song_id"] == "x" and row["path"] == str(path) and expect in row["reason"], row
        assert not data.MelCache.open(cache_dir, cat).has(1)
    else:
        assert (counts["computed"], counts["failed"]) == (2, 0) and not os.path.exists(report)
        cache = data.MelCache.open(cache_dir, cat)
        mel = cache.mel(1)
        assert torch.isfinite(mel).all()
        np.testing.assert_allclose(mel.numpy(), data.song_mel(str(path)).numpy(), atol=5e-3)  # float16 slot


def test_prepare_fails_only_over_max_bad_and_names_the_report(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", music(1.0), 16000)
    rows = [[f"s{i}", "a.wav", "t", "", ""] for i in range(9)] + [["bad", "nope.wav", "t", "", ""]]
    cat_path, cache_dir = write_catalog(tmp_path / "cat.csv", rows), str(tmp_path / "cache")
    report = os.path.join(cache_dir, "bad-00000-of-00001.csv")
    with pytest.raises(data.TooManyBadFiles) as e:  # 1 of 10 = 10% > 5%
        data.prepare(cat_path, cache_dir, max_bad=0.05)
    assert str(e.value).startswith(report) and "1 of 10 songs (10.0%)" in str(e.value)
    assert e.value.counts["computed"] == 9  # the good songs were saved before the error
    out = capsys.readouterr().out
    assert "9 computed, 0 kept from an earlier run, 1 failed (10.0%, max-bad 5.0%; see " + report in out
    counts = data.prepare(cat_path, cache_dir, max_bad=0.1)  # 10% is not over 10%: no error
    assert (counts["kept"], counts["computed"], counts["failed"]) == (9, 0, 1)

    # the command line: exit status 1 at the default 1%, 0 with --max-bad 0.5; the message names the report
    cmd = [sys.executable, os.path.join(ROOT, "data.py"), "prepare", "--catalog", cat_path, "--cache", cache_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 1 and f"error: {report}: 1 of 10 songs (10.0%)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["--max-bad", "0.5"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "1 failed (10.0%, max-bad 50.0%" in r.stdout, r.stderr[-2000:]


def test_20_minute_song_decodes_only_the_first_120_s(tmp_path):
    """Peak RSS of a process running song_mel on a 20-minute 48 kHz stereo WAV, against one running
    it on a 1 s file (imports, mel bank): the difference is what decoding costs."""
    big, small = tmp_path / "long.wav", tmp_path / "short.wav"
    sr, minutes = 48000, 20
    # a 16-bit stereo WAV written by hand: 130 s of tones, then a sparse tail of zeros (silence),
    # so the shared machine's disk is spared 200 MB of writes; the reader cannot tell the difference
    frames = minutes * 60 * sr
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + 4 * frames, b"WAVE", b"fmt ", 16, 1, 2, sr,
                         4 * sr, 4, 16, b"data", 4 * frames)
    head = (tones(130, sr) * 32767).astype("<i2")
    with open(big, "wb") as f:
        f.write(header + np.stack([head, head], 1).tobytes())
        f.truncate(len(header) + 4 * frames)
    assert sf.info(str(big)).frames == frames and sf.info(str(big)).channels == 2
    sf.write(small, music(1.0), 16000)
    size = os.path.getsize(big)
    full_decode = minutes * 60 * sr * 2 * 4  # float32 (frames, 2): what reading it all would hold
    # a driver process runs the two children one after the other, so RUSAGE_CHILDREN after each is
    # that child's peak (ru_maxrss is a max over children; the driver has no others)
    child = ("import sys, data; m = data.song_mel(sys.argv[1]); "
             "assert tuple(m.shape) in ((17, 128), (1251, 128)), m.shape")
    driver = (f"import json, resource, subprocess, sys\n"
              f"out = []\n"
              f"for p in sys.argv[1:]:\n"
              f"    subprocess.run([sys.executable, '-c', {child!r}, p], check=True, cwd={ROOT!r})\n"
              f"    out.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
              f"print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", driver, str(small), str(big)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    base, peak = json.loads(r.stdout.strip().splitlines()[-1])
    extra = peak - base
    print(f"\n20-min 48 kHz stereo WAV: file {size / 2**20:.0f} MiB; whole-file float32 decode would be "
          f"{full_decode / 2**20:.0f} MiB; song_mel peak RSS {peak / 2**20:.0f} MiB, "
          f"{extra / 2**20:.0f} MiB over a 1 s song ({base / 2**20:.0f} MiB)")
    assert extra < 0.3 * full_decode and extra < size


def test_resume_recomputes_only_rows_not_done_and_leaves_kept_slots_alone(tmp_path):
    rows = []
    for k in range(6):
        sf.write(tmp_path / f"{k}.wav", music(1.0 + 0.3 * k), 16000)
        rows.append([f"s{k}", f"{k}.wav", "t", "", ""])
    cat_path, cache_dir = write_catalog(tmp_path / "cat.csv", rows), str(tmp_path / "cache")
    assert data.prepare(cat_path, cache_dir)["computed"] == 6
    mel_path, len_path = (os.path.join(cache_dir, f"{k}-00000-of-00001.npy") for k in ("mel", "len"))
    # mark rows 1 and 4 not done; stamp a marker into every kept slot, which a recompute would overwrite
    lengths = np.load(len_path, allow_pickle=False)
    true_lengths = lengths.copy()
    lengths[[1, 4]] = data.NOT_DONE
    np.save(len_path, lengths)
    mels = np.lib.format.open_memmap(mel_path, mode="r+")
    mels[[0, 2, 3, 5]] = 7.0
    mels[[1, 4]] = np.nan
    mels.flush()
    kept_bytes = np.array(mels[[0, 2, 3, 5]]).tobytes()
    del mels

    counts = data.prepare(cat_path, cache_dir)
    assert (counts["kept"], counts["computed"], counts["failed"]) == (4, 2, 0)
    mels = np.load(mel_path, mmap_mode="r", allow_pickle=False)
    assert np.array(mels[[0, 2, 3, 5]]).tobytes() == kept_bytes  # untouched
    np.testing.assert_array_equal(np.load(len_path, allow_pickle=False), true_lengths)
    cache = data.MelCache.open(cache_dir, data.load_catalog(cat_path))
    for r in (1, 4):
        np.testing.assert_allclose(cache.mel(r).numpy(), data.song_mel(str(tmp_path / f"{r}.wav")).numpy(), atol=5e-3)


def test_prepare_killed_mid_run_resumes_to_a_complete_correct_cache(tmp_path):
    n = 200
    for k in range(n):
        sf.write(tmp_path / f"{k}.wav", tones(0.5 + 0.01 * k), 16000)
    cat_path = write_catalog(tmp_path / "cat.csv", [[f"s{k}", f"{k}.wav", "t", "", ""] for k in range(n)])
    cache_dir = str(tmp_path / "cache")
    len_path = os.path.join(cache_dir, "len-00000-of-00001.npy")
    # the child flushes often and takes >= 25 ms a song, so there is a window to kill it mid-run;
    # the kill itself is a real SIGKILL: no cleanup code runs
    child = ("import sys, time, data\n"
             "data.FLUSH_SECONDS = 0.05\n"
             "decode = data.song_mel\n"
             "data.song_mel = lambda p: (time.sleep(0.025), decode(p))[1]\n"
             "data.prepare(sys.argv[1], sys.argv[2])\n")
    proc = subprocess.Popen([sys.executable, "-c", child, cat_path, cache_dir], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline, done_at_kill = time.time() + 60, 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(len_path):
                done_at_kill = int((np.load(len_path, allow_pickle=False) >= 0).sum())
                if done_at_kill >= 5:
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    lengths = np.load(len_path, allow_pickle=False)
    done = int((lengths >= 0).sum())
    assert 5 <= done < n, done  # killed part way: some rows declared done, some not

    counts = data.prepare(cat_path, cache_dir)
    assert counts["kept"] == done and counts["computed"] == n - done and counts["failed"] == 0
    cat = data.load_catalog(cat_path)
    cache = data.MelCache.open(cache_dir, cat)  # refuses an unfinished cache, so this says: all done
    for r in range(n):
        np.testing.assert_allclose(cache.mel(r).numpy(), data.song_mel(cat[r].audio).numpy(), atol=5e-3)


def _catalog_with_bad_audio(tmp_path):
    sf.write(tmp_path / "a.wav", music(2.0), 16000)
    sf.write(tmp_path / "c.wav", music(1.5), 16000)
    (tmp_path / "d.wav").write_bytes(b"RIFF\x00\x00 definitely not audio")
    rows = [["a", "a.wav", "a", "", ""], ["b", "missing.wav", "b", "", ""],
            ["c", "c.wav", "c", "", ""], ["d", "d.wav", "d", "", ""]]
    return data.load_catalog(write_catalog(tmp_path / "cat.csv", rows))


def test_dataloader_worker_skips_undecodable_songs_with_a_count(tmp_path, capfd):
    cat = _catalog_with_bad_audio(tmp_path)
    # a spawned worker: a forked one would inherit pytest's warning recorder instead of printing
    # to stderr as it does in a training run
    loader = torch.utils.data.DataLoader(data.SongDataset(cat, [0, 1, 2, 3], on_error="skip"), batch_size=4,
                                         num_workers=1, collate_fn=data.Collator(tokenizer()),
                                         multiprocessing_context="spawn")
    (batch,) = list(loader)
    assert batch["row"].tolist() == [0, 2] and batch["mel"].shape[0] == 2
    err = capfd.readouterr().err  # the worker's warnings, on its stderr
    assert "skipping" in err and "row 1 (song 'b')" in err and "FileNotFoundError" in err
    assert "row 3 (song 'd')" in err and "dropped 2 of 4 items" in err and "2 dropped so far" in err

    # pairs: a pair with a bad song is dropped as a whole
    pairs = data.PairDataset(cat, [(0, 2), (1, 0), (2, 3)], on_error="skip")
    collate = data.Collator(tokenizer())
    with pytest.warns(UserWarning, match="dropped 2 of 3 items"):
        batch = collate([pairs[k] for k in range(3)])
    assert batch["trig_row"].tolist() == [0] and batch["rec_row"].tolist() == [2] and collate.skipped == 2
    with pytest.raises(AudioError, match="all 1 songs of this batch failed"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        collate([pairs[1]])


def test_dataloader_worker_raise_mode_names_the_catalog_row_not_a_bare_decoder_error(tmp_path):
    cat = _catalog_with_bad_audio(tmp_path)
    loader = torch.utils.data.DataLoader(data.SongDataset(cat, [0, 1]), batch_size=2, num_workers=1,
                                         collate_fn=data.Collator(tokenizer()))
    with pytest.raises(CatalogError) as e:  # re-raised in the main process with its type kept
        list(loader)
    msg = str(e.value)
    assert "cat.csv: row 1 (song 'b'), column 'audio'" in msg and "missing.wav" in msg and "FileNotFoundError" in msg
    with pytest.raises(ValueError, match="on_error"):
        data.SongDataset(cat, [0], on_error="ignore")


def _catalog3(tmp_path):
    return data.load_catalog(write_catalog(tmp_path / "c.csv", [[s, f"{s}.wav", "t", "", ""] for s in "abc"]))


CATALOG_CASES = {
    # case: (file name, bytes, substrings the CatalogError must contain: file, line/row, column)
    "missing_column": ("cat.csv", b"song_id,audio,title,artists\na,a.wav,T,A\n",
                       ["cat.csv", "line 1 (header)", "lyrics"]),
    "duplicate_song_id": ("cat.csv", b"song_id,audio,title,artists,lyrics\na,a.wav,T,,\nb,b.wav,T,,\na,c.wav,T,,\n",
                          ["cat.csv", "'a'", "row 0 (line 2)", "row 2 (line 4)", "column 'song_id'"]),
    "no_text": ("cat.csv", b"song_id,audio,title,artists,lyrics\na,a.wav,T,,\nb,b.wav, , ,\n",
                ["cat.csv", "line 3 (row 1)", "'title', 'artists', 'lyrics'", "'b'"]),
    "non_utf8": ("cat.csv", b"song_id,audio,title,artists,lyrics\na,a.wav,T,,\nb,b.wav,Caf\xe9,,\n",
                 ["cat.csv", "line 3 (row 1), column 'title'", "byte offset 58", "\\xe9"]),
    "non_utf8_header": ("cat.csv", b"song_id,audio,title,artists,lyrics,g\xe9nre\na,a.wav,T,,,x\n",
                        ["cat.csv", "line 1 (header)", "byte offset 36"]),
    "non_utf8_jsonl": ("cat.jsonl",
                       b'{"song_id": "a", "audio": "a.wav", "title": "T", "artists": "", "lyrics": "\xff"}\n',
                       ["cat.jsonl", "line 1 (row 0), column 'lyrics'"]),
    "too_many_fields": ("cat.csv", b"song_id,audio,title,artists,lyrics\na,a.wav,Hello, world,,\n",
                        ["cat.csv", "line 2 (row 0)", "6 fields"]),
    "runaway_quote": ("cat.csv", b'song_id,audio,title,artists,lyrics\na,a.wav,"T,,\n' + b"x" * 140_000 + b"\n",
                      ["cat.csv", "line 2 (row 0)", "field larger than field limit", "quote"]),
    "empty_audio": ("cat.csv", b"song_id,audio,title,artists,lyrics\na,,T,,\n",
                    ["cat.csv", "line 2 (row 0)", "column 'audio'"]),
    "empty_file": ("cat.csv", b"", ["cat.csv", "empty"]),
}


@pytest.mark.parametrize("case", list(CATALOG_CASES))
def test_bad_catalog_raises_catalog_error_naming_file_row_and_column(tmp_path, case):
    name, content, expect = CATALOG_CASES[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CatalogError) as e:
        data.load_catalog(str(tmp_path / name))
    for s in expect:
        assert s in str(e.value), (s, str(e.value))


def test_pairs_naming_unknown_songs_are_dropped_with_a_counted_warning_naming_the_file(tmp_path):
    cat = _catalog3(tmp_path)
    p = tmp_path / "pairs.csv"
    p.write_text("trigger_song_id,rec_song_id\na,b\na,zz\nyy,c\n")
    with pytest.warns(UserWarning, match=r"pairs.csv: dropped 2 of 3 rows naming a song not in the catalog"):
        assert data.load_pairs(str(p), cat) == [(0, 1)]


@pytest.mark.parametrize("content,expect", [
    ("trigger_song_id,rec_song_id\nzz,a\nb,yy\n", "pairs.csv: no usable pairs (2 rows, 2 naming songs not in"),
    ("trigger_song_id,rec_song_id\n", "pairs.csv: no usable pairs (0 rows"),
    ("trigger_song_id,rec\na,b\n", "pairs.csv: line 1 (header): missing required column(s) rec_song_id"),
    ("trigger_song_id,rec_song_id\na,b,c\n", "pairs.csv: line 2 (row 0): 3 fields"),
])
def test_unusable_pair_file_is_an_error_naming_the_file(tmp_path, content, expect):
    p = tmp_path / "pairs.csv"
    p.write_text(content)
    with pytest.raises(CatalogError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.load_pairs(str(p), _catalog3(tmp_path))
    assert expect in str(e.value), str(e.value)


def test_favourites_unknown_songs_dropped_with_count_and_bad_rows_named(tmp_path):
    cat = _catalog3(tmp_path)
    p = tmp_path / "fav.csv"
    p.write_text("user_id,song_id,timestamp\nu1,a,1\nu1,zz,2\nu2,b,3\n")
    with pytest.warns(UserWarning, match=r"fav.csv: dropped 1 of 3 rows.*line 3: 'zz'"):
        assert [(u, r) for u, r, _ in data.load_favourites(str(p), cat)] == [("u1", 0), ("u2", 1)]
    for timestamps, line in [("1\nu1,b,last tuesday", 3), ("nan", 2), ("1\nu1,b,inf", 3)]:
        p.write_text(f"user_id,song_id,timestamp\nu1,a,{timestamps}\n")
        with pytest.raises(CatalogError, match=rf"fav.csv: line {line} \(row {line - 2}\), column 'timestamp'"):
            data.load_favourites(str(p), cat)
    p.write_text("user_id,song_id,timestamp\nu1,zz,1\n")
    with pytest.raises(CatalogError, match="fav.csv: no usable favourites"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.load_favourites(str(p), cat)
    p.write_text("user_id,song,timestamp\nu1,a,1\n")
    with pytest.raises(CatalogError, match="fav.csv: line 1 \\(header\\): missing required column\\(s\\) song_id"):
        data.load_favourites(str(p), cat)


class _Payload:
    """Unpickling this runs code (it creates a file); a cache loader must never do that."""
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cache_with_a_pickled_length_file_is_refused_without_unpickling(tmp_path):
    sf.write(tmp_path / "a.wav", music(1.0), 16000)
    cat_path, cache_dir = write_catalog(tmp_path / "cat.csv", [["a", "a.wav", "t", "", ""]]), str(tmp_path / "cache")
    data.prepare(cat_path, cache_dir)
    cat = data.load_catalog(cat_path)
    len_path = os.path.join(cache_dir, "len-00000-of-00001.npy")
    marker = str(tmp_path / "code-ran")
    _Payload.marker = marker
    for how in ("object_npy", "raw_pickle", "wrong_dtype"):
        if how == "object_npy":  # a .npy holding an object array (its payload is a pickle)
            np.save(len_path, np.array([_Payload()], dtype=object), allow_pickle=True)
        elif how == "raw_pickle":
            with open(len_path, "wb") as f:
                pickle.dump(_Payload(), f)
        else:
            np.save(len_path, np.array([1251.0]))
        for load in (lambda: data.MelCache.open(cache_dir, cat), lambda: data.prepare(cat_path, cache_dir)):
            with pytest.raises(CatalogError, match="len-00000-of-00001.npy: "):
                load()
        assert not os.path.exists(marker)
    # the mel file too
    np.save(len_path, np.array([17], np.int32))
    np.save(os.path.join(cache_dir, "mel-00000-of-00001.npy"), np.array([_Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(CatalogError, match="mel-00000-of-00001.npy: not a log-mel file"):
        data.MelCache.open(cache_dir, cat).mel(0)
    assert not os.path.exists(marker)


def test_data_py_never_unpickles_or_runs_a_shell():
    tree = ast.parse(open(os.path.join(ROOT, "data.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not {"subprocess", "pickle", "marshal", "shelve"} & set(names), ast.unparse(node)
        if isinstance(node, ast.Call):
            f = ast.unparse(node.func)
            assert f not in ("os.system", "os.popen", "eval", "exec", "torch.load", "pickle.load"), ast.unparse(node)
            assert not any(k.arg == "shell" for k in node.keywords), ast.unparse(node)
            if f in ("np.load", "numpy.load"):  # every .npy read says so explicitly
                assert any(k.arg == "allow_pickle" and ast.unparse(k.value) == "False" for k in node.keywords), \
                    ast.unparse(node)


def test_catalog_paths_are_read_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = [f"$(touch {marker}).wav", f"x.wav; touch {marker}", f"`touch {marker}`"]
    cat_path = write_catalog(tmp_path / "cat.csv", [[f"s{k}", p, "t", "", ""] for k, p in enumerate(evil)])
    counts = data.prepare(cat_path, str(tmp_path / "cache"), max_bad=1.0)
    assert counts["failed"] == 3 and not marker.exists()
    reasons = [r["reason"] for r in read_report(counts["report"])]
    assert all(r.startswith("FileNotFoundError") for r in reasons), reasons


def test_random_crop_has_the_crop_length_stays_inside_the_song_and_is_seeded():
    mel = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 3)  # row t holds t: a crop shows its start
    starts = []
    for seed in range(200):
        crop = data.random_crop(mel, 20, np.random.default_rng(seed))
        assert crop.shape == (20, 3)
        s = int(crop[0, 0])
        assert torch.equal(crop[:, 0], torch.arange(s, s + 20, dtype=torch.float32))  # contiguous
        assert 0 <= s <= 30
        starts.append(s)
        assert torch.equal(crop, data.random_crop(mel, 20, np.random.default_rng(seed)))  # same seed, same crop
    assert min(starts) == 0 and max(starts) == 30 and len(set(starts)) > 20  # every start reachable
    assert torch.equal(data.random_crop(mel[:12], 20, np.random.default_rng(0)), mel[:12])  # short song: whole
    assert data.seconds_to_frames(10) == embeddings.CHUNK_FRAMES == 104


def test_aspect_and_caption_samplers_draw_what_the_paper_describes():
    aspects = data.split_aspects(" rock, loud;guitar |raw, , energetic,fast ")
    assert aspects == ["rock", "loud", "guitar", "raw", "energetic", "fast"]
    sizes = set()
    for seed in range(300):
        words = data.sample_aspects(aspects, np.random.default_rng(seed), max_aspects=5).split(", ")
        assert 1 <= len(words) <= 5 and len(set(words)) == len(words) and set(words) <= set(aspects)
        sizes.add(len(words))
    assert sizes == {1, 2, 3, 4, 5}
    assert data.sample_aspects(["solo"], np.random.default_rng(0)) == "solo"
    sentences = data.split_sentences("A calm track. It has no vocals!  Good for sleep? yes")
    assert sentences == ["A calm track.", "It has no vocals!", "Good for sleep?", "yes"]
    seen = set()
    for seed in range(100):
        caption = data.sample_caption(sentences, np.random.default_rng(seed))
        n = next(i for i in range(1, 5) if caption == " ".join(sentences[:i]))  # always a block from the start
        seen.add(n)
    assert seen == {1, 2, 3, 4}


class _MemoryCache:
    """Stands in for data.MelCache: row r's mel is r + a ramp over its 40 frames."""
    cache_dir = "memory"

    def has(self, row):
        return True

    def mel(self, row):
        return torch.arange(40, dtype=torch.float32)[:, None].repeat(1, 4) + 1000 * row


def test_crossmusim_samples_one_per_text_type_fall_back_and_depend_only_on_seed_epoch_index(tmp_path):
    write_catalog(tmp_path / "c.csv", [
        ("a", "a.wav", "Ta", "Art", "line one\nline two\n\nline three", "rock, loud, raw", "Loud. Fast. Raw."),
        ("b", "b.wav", "Tb", "Art", "", "jazz", ""),            # aspects only
        ("c", "c.wav", "Tc", "Art", "", "", ""),                # nothing: its X_t
    ], header=("song_id", "audio", "title", "artists", "lyrics", "tags", "caption"))
    catalog = data.load_catalog(str(tmp_path / "c.csv"))
    ds = data.CrossMuSimDataset(catalog, [0, 1, 2], _MemoryCache(), crop_frames=17, seed=1, aspect_column="tags")
    assert [(r, t) for r, t, _ in ds.samples] == [(0, "aspects"), (0, "caption"), (0, "lyrics"), (1, "aspects"),
                                                 (2, "song")]
    assert ds.counts == {"aspects": 2, "caption": 1, "lyrics": 1, "song": 1}
    for k, (row, kind, _) in enumerate(ds.samples):
        item = ds[k]
        assert item["row"] == row and item["mel"].shape == (17, 4) and int(item["mel"][0, 0]) // 1000 == row
    assert ds[2]["text"] in ("line one", "line two", "line three")
    assert ds[4]["text"] == catalog[2].text
    # a catalog without the aspect column (the default name is absent here): no aspect samples
    no_aspects = data.CrossMuSimDataset(catalog, [0, 1, 2], _MemoryCache(), crop_frames=17)
    assert [t for _, t, _ in no_aspects.samples] == ["caption", "lyrics", "song", "song"]
    # sample k is a function of (seed, epoch, k): the same in a fresh copy, new in another epoch
    again = data.CrossMuSimDataset(catalog, [0, 1, 2], _MemoryCache(), crop_frames=17, seed=1, aspect_column="tags")
    def draws(d):
        return [(d[k]["text"], int(d[k]["mel"][0, 0])) for k in range(len(d))]
    first = draws(ds)
    assert draws(again) == first == draws(ds)
    changed = False
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        changed |= draws(ds) != first
    assert changed
    frozen = data.CrossMuSimDataset(catalog, [0, 1, 2], _MemoryCache(), crop_frames=17, seed=1, aspect_column="tags",
                                    redraw=False)
    frozen.set_epoch(5)  # held-out samples: epoch 0's draws at every pass
    assert draws(frozen) == first
    with pytest.raises(ValueError, match="text_types"):
        data.CrossMuSimDataset(catalog, [0], _MemoryCache(), text_types=("lyrics", "chorus"))


def test_self_pairs_are_dropped_and_counted(tmp_path):
    from data import load_catalog
    _write_world(tmp_path)
    catalog = load_catalog(tmp_path / "catalog.csv")
    (tmp_path / "p.csv").write_text("trigger_song_id,rec_song_id\ns1,s2\ns3,s3\ns4, s4\ns2,s5\n")
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 rows pairing a song with itself; first on line\(s\) 3, 4"):
        pairs = data.load_pairs(tmp_path / "p.csv", catalog)
    assert pairs == [(1, 2), (2, 5)]


def test_pair_dataset_leaves_out_texts_no_loss_reads(tiny_world):
    from data import load_catalog
    catalog = load_catalog(tiny_world / "catalog.csv")
    both = data.PairDataset(catalog, [(0, 1)])[0]
    rec = data.PairDataset(catalog, [(0, 1)], texts=("rec",))[0]
    none = data.PairDataset(catalog, [(0, 1)], texts=())[0]
    assert both["trig_text"] == catalog[0].text and both["rec_text"] == catalog[1].text
    assert "trig_text" not in rec and rec["rec_text"] == catalog[1].text
    assert not any(k.endswith("_text") for k in none) and torch.equal(none["rec_mel"], both["rec_mel"])


def _catalog(tmp_path):
    # album A: s0 s1 s2 (s2 is test); album B: s3 s4; s5 alone; s6 no album; album C: s7 (val) s8
    rows = [("s0", "A", "train"), ("s1", "A", "train"), ("s2", "A", "test"), ("s3", "B", "train"),
            ("s4", "B", "train"), ("s5", "D", "train"), ("s6", "", "train"), ("s7", "C", "val"), ("s8", "C", "train")]
    path = tmp_path / "c.csv"
    path.write_text("song_id,audio,title,artists,lyrics,album,split\n"
                    + "".join(f"{i},{i}.wav,t {i},,,{a},{sp}\n" for i, a, sp in rows))
    return str(path)


def test_column_pairs_are_each_pair_of_a_shared_value_once_within_the_allowed_songs(tmp_path):
    c = data.load_catalog(_catalog(tmp_path))
    unordered = lambda pairs: sorted(tuple(sorted(p)) for p in pairs)  # noqa: E731
    # by hand: A -> (0,1) (0,2) (1,2); B -> (3,4); C -> (7,8); D and the empty album: none
    assert unordered(data.column_pairs(c, "album")) == [(0, 1), (0, 2), (1, 2), (3, 4), (7, 8)]
    train = data.split_rows(c, "train")
    assert unordered(data.column_pairs(c, "album", train)) == [(0, 1), (3, 4)]
    assert len(data.column_pairs(c, "album", max_pairs_per_group=1)) == 3  # one of each group's pairs
    with pytest.raises(data.CatalogError, match="no column 'work_id'"):
        data.column_pairs(c, "work_id")


def test_cli_pairs_from_column_writes_train_pairs_that_finetune_keeps_all_of(tmp_path):
    path = _catalog(tmp_path)
    out = tmp_path / "pairs.csv"
    p = subprocess.run([sys.executable, "data.py", "pairs-from-column", "--catalog", path, "--column", "album",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "pairs-from-column: 2 pairs" in p.stdout
    with open(out) as f:
        got = sorted(tuple(sorted((r["trigger_song_id"], r["rec_song_id"]))) for r in csv.DictReader(f))
    assert got == [("s0", "s1"), ("s3", "s4")]
    c = data.load_catalog(path)
    kept, dropped = data.drop_held_out_pairs(data.load_pairs(str(out), c), c)
    assert dropped == 0 and len(kept) == 2
    # the whole catalog's pairs: the three that touch s2 (test) or s7 (val) are the ones dropped
    kept, dropped = data.drop_held_out_pairs(data.column_pairs(c, "album"), c)
    assert dropped == 3 and sorted(tuple(sorted(p)) for p in kept) == [(0, 1), (3, 4)]


CATALOG = os.path.join(ROOT, "sample_data", "catalog.csv")
FAVOURITES = os.path.join(ROOT, "sample_data", "favourites.csv")


@pytest.mark.parametrize("argv, flag", [
    (["prepare", "--num_workers", "-1"], "--num_workers"), (["prepare", "--max_bad", "-1"], "--max_bad"),
    (["prepare", "--max_bad", "2"], "--max_bad"),
    (["mine-pairs", "--window", "0"], "--window"), (["mine-pairs", "--window", "1"], "--window"),
    (["mine-pairs", "--max_pairs_per_user", "-2"], "--max_pairs_per_user"), (["mine-pairs", "--seed", "-1"], "--seed"),
    (["pairs-from-column", "--max_pairs_per_group", "0"], "--max_pairs_per_group")])
def test_numbers_of_the_wrong_sign_or_size_are_usage_errors_before_any_work(tmp_path, capsys, argv, flag):
    """Bugs checked: prepare --num_workers -1 wrote part of a cache, then died in DataLoader;
    --window 0 was an AssertionError, --max_pairs_per_user -2 numpy's 'negative dimensions'."""
    io = {"prepare": ["--catalog", CATALOG, "--cache", str(tmp_path / "cache")],
          "mine-pairs": ["--favourites", FAVOURITES, "--catalog", CATALOG, "--out", str(tmp_path / "p.csv")],
          "pairs-from-column": ["--catalog", CATALOG, "--column", "artist_id", "--out", str(tmp_path / "p.csv")]}[argv[0]]
    with pytest.raises(SystemExit) as e:
        data.main([argv[0], *io, *argv[1:]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err and ": expected " in err, err
    assert os.listdir(tmp_path) == []
