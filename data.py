"""
Data for HTCL, the real-data pipeline: audio front end, song catalog, user-behaviour files, a
log-mel cache, and the PyTorch datasets and collator. (The bundled synthetic world that feeds it
is written by sample_data/make_world.py.)

Paper: Pan et al., "HTCL", ICMR 2025 (arXiv 2505.23298).
  Sec. 2.1 / 3.1.3  input: the first 120 s of a song as a 128-bin log-mel spectrogram
                    (128 ms Hann window, 96 ms hop -> 1251 frames), and the song text X_t
                    (title, artists, lyrics) for BERT.
  Sec. 2.2          stage-2 training pairs <trigger song, recommended song> that users favoured.
  Table 2           HTCL_w_CF: pairs mined from co-occurrence in users' favourite sequences.
CrossMuSim, the stage-1 variant: each text type (aspects, caption, a lyric line) its own
training sample with a random audio crop (CrossMuSimDataset).

Commands:
  python data.py prepare --catalog sample_data/catalog.csv --cache cache/      # log-mels -> .npy
  python data.py prepare --catalog C --cache DIR --shard 3/8 --num_workers 4   # one shard of 8
  python data.py prepare --catalog C --shards s3://bucket/mels --shard 3/8     # tar shards (shards.py), part 3 of 8
  python data.py mine-pairs --favourites sample_data/favourites.csv \\
      --catalog sample_data/catalog.csv --out cf_pairs.csv --window 5          # HTCL_w_CF pairs
  python data.py pairs-from-column --catalog C --column album_id --out pairs.csv  # no user log: same album

Read top to bottom: audio -> catalog -> behaviour files -> cache -> datasets -> CLI.
"""

import argparse
import csv
import glob
import hashlib
import io
import json
import math
import os
import re
import stat
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

# -----------------------------------------------------------------------------
# Audio front end (Sec. 3.1.3)

SAMPLE_RATE = 16000  # the paper gives no rate; at 16 kHz the window and hop are whole samples
N_FFT = 2048         # 128 ms Hann window
HOP_LENGTH = 1536    # 96 ms hop
N_MELS = 128
MAX_SECONDS = 120    # "the first 120 s of each song"
MAX_FRAMES = 1 + MAX_SECONDS * SAMPLE_RATE // HOP_LENGTH  # = 1251, centred STFT
TOP_DB = 80.0        # released code: dB relative to the song's max, floored 80 dB below it
# The audio encoder's conv stem (k=5,3,3, s=2,2,2, no padding) maps T frames to
# ((T-5)//2+1 - 3)//2+1 ... tokens; it needs T >= 17 for a single token, so shorter songs are
# padded with silence up to this many frames.
MIN_FRAMES = 17
MIN_SAMPLES = (MIN_FRAMES - 1) * HOP_LENGTH  # centred STFT: frames = 1 + samples // hop

assert MAX_FRAMES == 1251


class AudioError(ValueError):
    """An audio file that cannot be used as a song; the message names the file and says why."""


def _all_finite(x):
    """True when a 1-D float array (numpy or torch) holds no NaN/inf.

    x @ x is NaN or inf whenever one sample is, and costs ~1/10 of an elementwise isfinite over a
    song (bench.py); it can also overflow for finite samples above ~1e19, which only sends such a
    file to the exact check."""
    return math.isfinite(float(x @ x))


def read_prefix(f, max_seconds=MAX_SECONDS):
    """The first max_seconds of an open sf.SoundFile -> (frames, channels) array, as decoded.

    16-bit files come back as int16, to be scaled by 1/32768: the same numbers as libsndfile's
    float32 read, and ~2x faster for a wav (its per-sample convert is slow); others as float32."""
    return f.read(frames=int(math.ceil(max_seconds * f.samplerate)), always_2d=True,
                  dtype="int16" if f.subtype == "PCM_16" else "float32")


def load_audio(path, max_seconds=MAX_SECONDS):
    """Decode the first `max_seconds` of an audio file -> float32 mono numpy array at 16 kHz.

    Only a bounded number of frames is read, so a 20-minute file never sits in memory.
    Channels are averaged; other sample rates are resampled with soxr (high quality).
    A file that cannot be used raises with the path and the reason: FileNotFoundError or
    PermissionError (the OS's words), or AudioError (empty, not a file, not audio, corrupt, no frames).
    """
    st = os.stat(path)  # FileNotFoundError here, not libsndfile's vague "System error"
    if not stat.S_ISREG(st.st_mode):  # a directory, or a pipe that would block the reader forever
        raise AudioError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    # Python opens the file and libsndfile reads from the handle, so "permission denied" comes
    # out as a PermissionError rather than as a format error
    with open(path, "rb") as fh:
        try:
            with sf.SoundFile(fh) as f:
                sr, pcm16 = f.samplerate, f.subtype == "PCM_16"
                x = read_prefix(f, max_seconds)
        except sf.LibsndfileError as e:  # unknown container, truncated header, FLAC lost sync, ...
            raise AudioError(f"{path}: cannot decode: {e.error_string.strip()}") from None
    if len(x) == 0:  # e.g. a WAV header with no data: padding it would invent a silent song
        raise AudioError(f"{path}: no audio frames")
    scale = (1 / 32768 if pcm16 else 1.0) / x.shape[1]
    # downmix (and int16 scaling) as one matmul: ~2x faster than mean(axis=1) (bench.py)
    x = x.astype(np.float32, copy=False) @ np.full(x.shape[1], scale, np.float32)
    if not _all_finite(x):  # float WAV/FLAC can hold NaN/inf; zero them before the resampler smears them
        bad = ~np.isfinite(x)
        warnings.warn(f"{path}: {int(bad.sum())} non-finite samples replaced with 0")
        x[bad] = 0.0
    if sr != SAMPLE_RATE:
        x = soxr.resample(x, sr, SAMPLE_RATE)
    return np.ascontiguousarray(x[: int(max_seconds * SAMPLE_RATE)], dtype=np.float32)


_MEL_FILTERS = None  # (1025, 128) float32, built once per process


def _mel_filters():
    global _MEL_FILTERS
    if _MEL_FILTERS is None:
        # imported here so that `import data` stays light for DataLoader workers
        from transformers.audio_utils import mel_filter_bank
        fb = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS,
                             min_frequency=0.0, max_frequency=SAMPLE_RATE / 2,
                             sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        _MEL_FILTERS = torch.from_numpy(fb).float()  # same bank as librosa.filters.mel(sr, 2048, 128)
    return _MEL_FILTERS


def log_mel(waveform, sample_rate):
    """1-D waveform -> (frames, 128) float32 standardized log-mel spectrogram.

    Pipeline (released code, librosa-equivalent):
      centred STFT, n_fft 2048, hop 1536, periodic Hann, zero padding at the edges
        (pad_mode='constant' is librosa>=0.10's default; torch defaults to 'reflect')
      -> power |X|^2 -> slaney mel bank, 0-8 kHz
      -> dB relative to the song's max mel power, floored at -80 dB (librosa.power_to_db(ref=np.max))
      -> per-song standardization (x - mean) / (std + 1e-8).
    A 120 s song at 16 kHz gives exactly 1251 frames. All-silent input gives zeros.
    """
    w = torch.as_tensor(waveform).detach().to("cpu", torch.float32)
    if w.dim() != 1:
        raise ValueError(f"log_mel wants a 1-D mono waveform, got shape {tuple(w.shape)}; downmix first")
    if sample_rate != SAMPLE_RATE:
        w = torch.from_numpy(soxr.resample(w.numpy(), sample_rate, SAMPLE_RATE).astype(np.float32))
    if not _all_finite(w):  # one NaN sample would turn the whole standardized song into NaN
        bad = ~torch.isfinite(w)
        warnings.warn(f"log_mel: {int(bad.sum())} non-finite samples replaced with 0")
        w = torch.where(bad, torch.zeros_like(w), w)
    # float32 throughout, like librosa: FFT round-off (~1e-7 of the peak) sits far under the
    # -80 dB floor, and it is ~2x faster than float64 (bench.py); checked against a float64 reference.
    spec = torch.stft(w, n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=N_FFT,
                      window=torch.hann_window(N_FFT, periodic=True, dtype=torch.float32),
                      center=True, pad_mode="constant", return_complex=True)  # (1025, frames)
    power = spec.real ** 2 + spec.imag ** 2
    mel = power.T @ _mel_filters()  # (frames, 128)
    db = 10.0 * torch.log10(mel.clamp(min=1e-10)) - 10.0 * torch.log10(mel.max().clamp(min=1e-10))
    db = db.clamp(min=db.max().item() - TOP_DB)
    # NOTE(paper): population std (ddof=0); the released code's "std + 1e-8" does not say which,
    # and over ~160k values the two differ by < 1e-5 relative.
    x = (db - db.mean()) / (db.std(correction=0) + 1e-8)
    return x.to(torch.float32)


def song_mel(path):
    """Audio file -> (frames <= 1251, 128) log-mel of its first 120 s, padded to >= MIN_FRAMES."""
    x = load_audio(path)
    if len(x) < MIN_SAMPLES:
        # silence = zeros in the waveform, before log_mel, so it takes the -80 dB floor value
        x = np.pad(x, (0, MIN_SAMPLES - len(x)))
    return log_mel(torch.from_numpy(x), SAMPLE_RATE)


# -----------------------------------------------------------------------------
# Song catalog

class CatalogError(ValueError):
    """A problem in a data file; the message names the file, the row/line and the column."""


REQUIRED_COLUMNS = ("song_id", "audio", "title", "artists", "lyrics")


@dataclass
class Song:
    song_id: str
    audio: str    # absolute path (relative paths in the catalog are resolved from its folder)
    title: str
    artists: str
    lyrics: str
    labels: dict = field(default_factory=dict)  # every other column: genre, language, split, ...

    @property
    def text(self):
        """The song text X_t fed to BERT (Sec. 2.1: "title, lyrics, artists in a simple format"):
        'title: {title}; artists: {artists}; lyrics: {lyrics}'. BERT truncates it to 512 tokens,
        so the lyrics, which come last, are what gets cut."""
        return f"title: {self.title}; artists: {self.artists}; lyrics: {self.lyrics}"


class Catalog:
    """The songs of a catalog file, in file order. Row r (0-based) is `catalog[r]`."""

    def __init__(self, path, songs, columns, raw_audio):
        self.path = path
        self.songs = songs
        self.columns = columns          # all column names, file order
        self.raw_audio = raw_audio      # the audio column as written (for the cache fingerprint)
        self.index = {s.song_id: r for r, s in enumerate(songs)}

    def __len__(self):
        return len(self.songs)

    def __getitem__(self, row):
        return self.songs[row]

    def label(self, row, column):
        s = self.songs[row]
        return getattr(s, column) if column in REQUIRED_COLUMNS else s.labels.get(column, "")

    def rows_with(self, column, value):
        """Rows whose `column` equals `value`, e.g. rows_with('split', 'train')."""
        if column not in self.columns:
            raise CatalogError(f"{self.path}: no column '{column}' (columns: {', '.join(self.columns)})")
        return [r for r in range(len(self)) if self.label(r, column) == value]

    def fingerprint(self):
        """sha1 over the song_id and audio columns: a cache built for another catalog is refused."""
        h = hashlib.sha1()
        for s, a in zip(self.songs, self.raw_audio):
            h.update(s.song_id.encode() + b"\0" + a.encode() + b"\n")
        return h.hexdigest()


def _read_text(path):
    """File -> str, with a CatalogError naming the line, row, column and byte offset of the
    first non-UTF-8 byte."""
    data = open(path, "rb").read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        where = _field_with_bad_bytes(path, data.decode("utf-8-sig", errors="surrogateescape"))
        raise CatalogError(f"{path}: line {line}{where} (byte offset {e.start}): bytes "
                           f"{data[e.start:e.end]!r} are not UTF-8; re-save the file as UTF-8") from None


def _field_with_bad_bytes(path, text):
    """' (row R), column C' of the first field holding an undecodable byte, for the error message.
    `text` was decoded with errors='surrogateescape', so each bad byte is a lone surrogate."""
    bad = lambda v: any("\udc80" <= ch <= "\udcff" for ch in str(v))  # noqa: E731
    try:
        if path.endswith((".jsonl", ".json")):
            rows = [json.loads(raw) for raw in text.splitlines() if raw.strip()]
            header = []
        else:
            rows = [v for v in csv.reader(io.StringIO(text, newline="")) if v]
            header, rows = rows[0], [dict(zip(rows[0], v)) for v in rows[1:]]
            if bad("".join(header)):
                return " (header)"
        for row, rec in enumerate(rows):
            for column, value in (rec.items() if isinstance(rec, dict) else []):
                if bad(column) or bad(value):
                    return f" (row {row}), column '{column}'"
    except (ValueError, IndexError, csv.Error):  # the file is broken in another way too; the line will do
        pass
    return ""


def _read_records(path, required):
    """CSV or JSONL file -> (columns, [(line, {column: str})]). Checks the required columns."""
    text = _read_text(path)
    records = []
    if path.endswith((".jsonl", ".json")):
        columns = []
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise CatalogError(f"{path}: line {line}, column {e.colno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise CatalogError(f"{path}: line {line}: expected a JSON object, got {type(obj).__name__}")
            for k in obj:
                if k not in columns:
                    columns.append(k)
            missing = [c for c in required if c not in obj]
            if missing:
                raise CatalogError(f"{path}: line {line} (row {len(records)}): missing column(s) "
                                   f"{', '.join(missing)}; required: {', '.join(required)}")
            records.append((line, {k: "" if v is None else str(v) for k, v in obj.items()}))
        return columns, records
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise CatalogError(f"{path}: file is empty; expected a header with columns {', '.join(required)}")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise CatalogError(f"{path}: line 1 (header): missing required column(s) {', '.join(missing)}; "
                           f"found: {', '.join(header)}")
    start = reader.line_num + 1
    try:
        for values in reader:
            line, start = start, reader.line_num + 1  # first line of this record (it may span lines)
            if not values:
                continue
            if len(values) != len(header):
                raise CatalogError(f"{path}: line {line} (row {len(records)}): {len(values)} fields but the "
                                   f"header has {len(header)}; is a comma inside a field unquoted?")
            records.append((line, dict(zip(header, values))))
    except csv.Error as e:  # e.g. an unbalanced quote swallowing the rest of the file into one field
        raise CatalogError(f"{path}: line {start} (row {len(records)}): {e}; is a quote unbalanced?") from None
    return header, records


def load_catalog(path):
    """Catalog CSV or JSONL -> Catalog. Required columns: song_id, audio, title, artists, lyrics.
    Any other column becomes a label (genre, language, split, ...). Empty text fields are fine;
    a song with no title, artists or lyrics at all is an error (BERT would see only the template)."""
    path = str(path)
    columns, records = _read_records(path, REQUIRED_COLUMNS)
    base = os.path.dirname(os.path.abspath(path))
    songs, raw_audio, first_seen = [], [], {}
    for row, (line, rec) in enumerate(records):
        where = f"{path}: line {line} (row {row})"
        sid = rec["song_id"].strip()
        if not sid:
            raise CatalogError(f"{where}, column 'song_id': empty song_id")
        if sid in first_seen:
            r0, l0 = first_seen[sid]
            raise CatalogError(f"{path}: duplicate song_id '{sid}' in row {r0} (line {l0}) and "
                               f"row {row} (line {line}), column 'song_id'")
        first_seen[sid] = (row, line)
        audio = rec["audio"].strip()
        if not audio:
            raise CatalogError(f"{where}, column 'audio': empty audio path for song '{sid}'")
        if not (rec["title"].strip() or rec["artists"].strip() or rec["lyrics"].strip()):
            raise CatalogError(f"{where}, columns 'title', 'artists', 'lyrics': all empty for song "
                               f"'{sid}', so it has no text")
        labels = {k: v for k, v in rec.items() if k not in REQUIRED_COLUMNS}
        songs.append(Song(sid, os.path.normpath(os.path.join(base, audio)), rec["title"],
                          rec["artists"], rec["lyrics"], labels))
        raw_audio.append(audio)
    if not songs:
        raise CatalogError(f"{path}: no songs")
    return Catalog(path, songs, columns, raw_audio)


def split_rows(catalog, split, seed=3407, val_fraction=0.1):
    """Catalog rows of one split ('train' | 'val' | 'test').

    With a 'split' column the rows whose label equals `split`. Without one, the released code's
    seeded random 90/10 train/val split (there is then no test split: 'test' gives [])."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, not {split!r}")
    if "split" in catalog.columns:
        return catalog.rows_with("split", split)
    if split == "test":
        return []
    perm = np.random.default_rng(seed).permutation(len(catalog))
    n_val = int(round(len(catalog) * val_fraction))
    return sorted(perm[:n_val].tolist() if split == "val" else perm[n_val:].tolist())


# -----------------------------------------------------------------------------
# User-behaviour files (Sec. 2.2 pairs; Table 2 HTCL_w_CF)

def _warn_unknown(path, dropped, total, what):
    if dropped:
        first = "; ".join(f"line {line}: '{sid}'" for line, sid in dropped[:5])
        warnings.warn(f"{path}: dropped {len(dropped)} of {total} rows naming a song not in the "
                      f"catalog ({what}); first: {first}")


def load_pairs(path, catalog):
    """Pairs CSV (trigger_song_id, rec_song_id) -> [(trigger_row, rec_row)] catalog rows.
    Rows naming an unknown song, and self-pairs (s, s), are dropped with a counted warning."""
    path = str(path)
    _, records = _read_records(path, ("trigger_song_id", "rec_song_id"))
    pairs, dropped, self_pairs = [], [], []
    for line, rec in records:
        t, r = rec["trigger_song_id"].strip(), rec["rec_song_id"].strip()
        if t == r:  # a song paired with itself teaches nothing (mine-pairs skips these too)
            self_pairs.append(line)
        elif t in catalog.index and r in catalog.index:
            pairs.append((catalog.index[t], catalog.index[r]))
        else:
            dropped.append((line, t if t not in catalog.index else r))
    _warn_unknown(path, dropped, len(records), catalog.path)
    if self_pairs:
        warnings.warn(f"{path}: dropped {len(self_pairs)} of {len(records)} rows pairing a song with itself; "
                      f"first on line(s) {', '.join(map(str, self_pairs[:5]))}")
    if not pairs:
        raise CatalogError(f"{path}: no usable pairs ({len(records)} rows, {len(dropped)} naming songs "
                           f"not in {catalog.path}); do the song ids match the catalog?")
    return pairs


def drop_held_out_pairs(pairs, catalog, seed=3407, path="pairs"):
    """Stage-2 pairs whose two songs are both in the train split (split_rows, the catalog's split
    column or the seeded 90/10) -> (kept pairs, number dropped). A pair touching a val or test song
    would train on the songs that validation, the probes and HR@100 score; each is dropped, and the
    count printed. None left is an error."""
    train = set(split_rows(catalog, "train", seed=seed))
    kept = [(t, r) for t, r in pairs if t in train and r in train]
    dropped = len(pairs) - len(kept)
    if dropped:
        print(f"{path}: dropped {dropped} of {len(pairs)} pairs touching a song outside the train split "
              f"(val/test songs are held out for validation and evaluation); {len(kept)} pairs left")
    if not kept:
        raise CatalogError(f"{path}: every one of its {len(pairs)} pairs touches a val or test song of "
                           f"{catalog.path}; stage 2 trains on pairs of train songs only (data.py mine-pairs "
                           f"--split train)")
    return kept, dropped


def _parse_time(value):
    try:
        t = float(value)  # unix seconds
    except ValueError:
        from datetime import datetime
        return datetime.fromisoformat(value.strip()).timestamp()  # e.g. 2024-05-01T12:00:00
    if not math.isfinite(t):  # float() takes "nan" and "inf", which would scramble the time order
        raise ValueError(value)
    return t


def load_favourites(path, catalog):
    """User log CSV (user_id, song_id, timestamp) -> [(user_id, row, timestamp)] sorted by user,
    then time. Timestamps are unix seconds or ISO 8601. Unknown songs: dropped, counted, warned."""
    path = str(path)
    _, records = _read_records(path, ("user_id", "song_id", "timestamp"))
    favs, dropped = [], []
    for row, (line, rec) in enumerate(records):
        sid = rec["song_id"].strip()
        try:
            ts = _parse_time(rec["timestamp"])
        except ValueError:
            raise CatalogError(f"{path}: line {line} (row {row}), column 'timestamp': "
                               f"{rec['timestamp']!r} is neither unix seconds nor ISO 8601") from None
        if sid not in catalog.index:
            dropped.append((line, sid))
            continue
        favs.append((rec["user_id"].strip(), catalog.index[sid], ts))
    _warn_unknown(path, dropped, len(records), catalog.path)
    if not favs:
        raise CatalogError(f"{path}: no usable favourites ({len(records)} rows, {len(dropped)} naming songs "
                           f"not in {catalog.path}); do the song ids match the catalog?")
    favs.sort(key=lambda f: (f[0], f[2]))  # stable: equal timestamps keep file order
    return favs


def column_pairs(catalog, column, rows=None, max_pairs_per_group=None, seed=3407):
    """Stage-2 pairs without a user log: songs that share a value of `column` (same work, same album)
    -> [(trigger_row, rec_row)]. Each unordered pair of a group once, in a seeded random order of the
    two (the stage-2 loss reads the recommended song's text); empty values form no group. rows: the
    songs allowed (e.g. the train split), default all; max_pairs_per_group: a seeded sample of each
    group's pairs, so one big album does not dominate. NOTE(paper): HTCL's pairs are favoured
    recommendations; shared metadata is a stand-in where there is no log."""
    if column not in catalog.columns:
        raise CatalogError(f"{catalog.path}: no column '{column}' (columns: {', '.join(catalog.columns)})")
    rng = np.random.default_rng(seed)
    groups = {}
    for r in (range(len(catalog)) if rows is None else sorted(rows)):
        value = catalog.label(r, column).strip()
        if value:
            groups.setdefault(value, []).append(r)
    out = []
    for value in sorted(groups):
        members = groups[value]
        pairs = [(a, b) for i, a in enumerate(members) for b in members[i + 1:]]
        if max_pairs_per_group and len(pairs) > max_pairs_per_group:
            pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), max_pairs_per_group, replace=False))]
        out += [(b, a) if rng.random() < 0.5 else (a, b) for a, b in pairs]
    return out


def mine_cooccurrence_pairs(favourites, window=5, max_pairs_per_user=None, seed=3407):
    """HTCL_w_CF: training pairs from co-occurrence in users' favourite sequences.

    Rule: in each user's time-ordered favourites s_0, s_1, ..., songs s_i and s_j co-occur when
    they fall in one sliding window of `window` consecutive favourites, i.e. 1 <= j - i < window;
    the earlier one is the trigger. window=2 gives consecutive pairs only. Pairs of a song with
    itself are skipped. Deduplication is on the unordered pair, first occurrence kept (users in
    sorted order), because the stage-2 loss is symmetric in the two songs. With
    max_pairs_per_user, a user's pairs are subsampled (seeded) so heavy users do not dominate.
    `favourites` is load_favourites' output: [(user, row, timestamp)] sorted by user then time.
    """
    assert window >= 2, "window must cover at least two favourites"
    rng = np.random.default_rng(seed)
    by_user = {}
    for user, row, _ in favourites:
        by_user.setdefault(user, []).append(row)
    out, seen = [], set()
    for user in sorted(by_user):
        seq = by_user[user]
        pairs = [(seq[i], seq[j]) for i in range(len(seq))
                 for j in range(i + 1, min(i + window, len(seq))) if seq[i] != seq[j]]
        if max_pairs_per_user is not None and len(pairs) > max_pairs_per_user:
            keep = np.sort(rng.choice(len(pairs), max_pairs_per_user, replace=False))
            pairs = [pairs[k] for k in keep]
        for a, b in pairs:
            key = (min(a, b), max(a, b))
            if key not in seen:
                seen.add(key)
                out.append((a, b))
    return out


def write_csv(path, header, rows):
    """A CSV file as the loaders above read it: UTF-8, one header row, \n line ends."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


# -----------------------------------------------------------------------------
# Log-mel cache: decode every song once, then train from memory-mapped .npy shards.
#
# Layout of cache_dir for shard i of n (catalog rows [i*N//n, (i+1)*N//n)):
#   mel-{i:05d}-of-{n:05d}.npy   float16 (rows, 1251, 128): one fixed slot per song (~320 KB), so
#                                the file size is known before decoding and slots fill in any order
#   len-{i:05d}-of-{n:05d}.npy   int32 (rows,): valid frames per slot; -1 not done, -2 failed
#   meta-{i:05d}-of-{n:05d}.json {num_shards, shard, start_row, stop_row, catalog_rows,
#                                 catalog_fingerprint}
#   bad-{i:05d}-of-{n:05d}.csv   song_id,path,reason for files that failed to decode

NOT_DONE, FAILED = -1, -2
FLUSH_SECONDS = 30  # prepare declares finished slots at least this often; a kill -9 loses at most this much work


def shard_bounds(num_rows, shard, num_shards):
    return shard * num_rows // num_shards, (shard + 1) * num_rows // num_shards


def _shard_file(cache_dir, kind, shard, num_shards, ext):
    return os.path.join(cache_dir, f"{kind}-{shard:05d}-of-{num_shards:05d}.{ext}")


def _save_lengths(path, lengths):
    # write-then-rename: a crash never leaves a half-written length file claiming done rows
    with open(path + ".tmp", "wb") as f:
        np.save(f, lengths)
    os.replace(path + ".tmp", path)


def _load_lengths(path, rows):
    """A len-*.npy file -> int32 (rows,). Never unpickles: a cache folder may come from anywhere,
    and an object array in a .npy file runs code when it is loaded with allow_pickle=True."""
    try:
        lengths = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CatalogError(f"{path}: not a length file written by prepare ({e}); delete it and "
                           f"prepare again") from None
    if lengths.dtype != np.int32 or lengths.shape != (rows,):
        raise CatalogError(f"{path}: expected int32 ({rows},), found {lengths.dtype} {lengths.shape}; "
                           f"delete it and prepare again")
    return lengths


def _load_meta(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, OSError) as e:  # a half-written or foreign file: say which one
        raise CatalogError(f"{path}: unreadable cache metadata ({e}); delete the cache folder and "
                           f"prepare again") from None


def _open_mels(path, rows, mode="r"):
    """A mel-*.npy file -> float16 memmap (rows, 1251, 128), its header checked, no unpickling."""
    try:
        mels = np.load(path, mmap_mode=mode, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CatalogError(f"{path}: not a log-mel file written by prepare ({e}); delete it and "
                           f"prepare again") from None
    if mels.dtype != np.float16 or mels.shape != (rows, MAX_FRAMES, N_MELS):
        raise CatalogError(f"{path}: expected float16 {(rows, MAX_FRAMES, N_MELS)}, found {mels.dtype} "
                           f"{mels.shape}; delete it and prepare again")
    return mels


class MelCache:
    """Read side of the cache. cache.mel(row) -> (frames, 128) float32; cache.has(row)."""

    def __init__(self, cache_dir, num_shards, starts, lengths):
        self.cache_dir, self.num_shards = cache_dir, num_shards
        self.starts = starts          # first catalog row of each shard
        self.lengths = lengths        # per shard: int32 valid-frame counts
        self._mels = None             # memmaps, opened lazily in each process (see __getstate__)

    @staticmethod
    def open(cache_dir, catalog):
        metas = sorted(glob.glob(os.path.join(cache_dir, "meta-*-of-*.json")))
        cmd = f"python data.py prepare --catalog {catalog.path} --cache {cache_dir}"
        if not metas:
            raise CatalogError(f"{cache_dir}: no log-mel cache here; build it with: {cmd}")
        num_shards = {_load_meta(m)["num_shards"] for m in metas}
        if len(num_shards) != 1:
            raise CatalogError(f"{cache_dir}: shards of different runs ({sorted(num_shards)} shards); "
                               f"delete the folder and prepare again")
        n = num_shards.pop()
        fp, problems, starts, lengths = catalog.fingerprint(), [], [], []
        for i in range(n):
            meta_path = _shard_file(cache_dir, "meta", i, n, "json")
            len_path = _shard_file(cache_dir, "len", i, n, "npy")
            if not os.path.exists(meta_path) or not os.path.exists(len_path):
                problems.append(f"shard {i}/{n} missing: {cmd} --shard {i}/{n}")
                continue
            meta = _load_meta(meta_path)
            if meta["catalog_fingerprint"] != fp or meta["catalog_rows"] != len(catalog):
                raise CatalogError(f"{meta_path}: built for another catalog ({meta['catalog_rows']} rows) "
                                   f"than {catalog.path} ({len(catalog)} rows, song_id/audio differ); "
                                   f"use another --cache folder or delete this one")
            lens = _load_lengths(len_path, meta["stop_row"] - meta["start_row"])
            todo = np.flatnonzero(lens == NOT_DONE)
            if len(todo):
                ids = ", ".join(catalog[meta["start_row"] + k].song_id for k in todo[:3])
                problems.append(f"shard {i}/{n} unfinished: {len(todo)} rows not done (e.g. {ids}): "
                                f"{cmd} --shard {i}/{n}")
            starts.append(meta["start_row"])
            lengths.append(lens)
        if problems:
            raise CatalogError(f"{cache_dir}: log-mel cache incomplete:\n  " + "\n  ".join(problems))
        return MelCache(cache_dir, n, starts, lengths)

    def _locate(self, row):
        i = int(np.searchsorted(self.starts, row, side="right")) - 1
        return i, row - self.starts[i]

    def has(self, row):
        i, k = self._locate(row)
        return bool(self.lengths[i][k] >= 0)

    def mel(self, row):
        if self._mels is None:
            self._mels = [_open_mels(_shard_file(self.cache_dir, "mel", i, self.num_shards, "npy"),
                                     len(self.lengths[i])) for i in range(self.num_shards)]
        i, k = self._locate(row)
        n = int(self.lengths[i][k])
        if n < 0:
            raise CatalogError(f"{self.cache_dir}: row {row} failed to decode during prepare; see "
                               f"{_shard_file(self.cache_dir, 'bad', i, self.num_shards, 'csv')}")
        return torch.from_numpy(np.array(self._mels[i][k, :n], dtype=np.float32))  # copy out

    def __getstate__(self):
        # DataLoader workers started with spawn pickle the dataset; a pickled memmap would copy
        # the whole array, so send paths only and reopen in the worker.
        return {**self.__dict__, "_mels": None}


class _DecodeRows(Dataset):
    """prepare's decode jobs (and shards.write's), so a DataLoader runs song_mel in worker processes
    -> (row, fp16 (frames, 128) log-mel or None, why not). mel_fn: song_mel; tests pass fakes."""

    def __init__(self, catalog, rows, mel_fn=None):
        self.items, self.mel_fn = [(int(r), catalog[int(r)].audio) for r in rows], mel_fn

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        row, path = self.items[k]
        try:
            mel = (self.mel_fn or song_mel)(path)
            mel = (mel.numpy() if torch.is_tensor(mel) else np.asarray(mel)).astype(np.float16)
            if mel.ndim != 2 or mel.shape[1] != N_MELS or not 0 < len(mel) <= MAX_FRAMES:
                raise ValueError(f"log-mel of shape {mel.shape}, not (1..{MAX_FRAMES}, {N_MELS})")
            return row, mel, ""
        except Exception as e:  # a bad file is reported and skipped, it does not stop the run
            return row, None, f"{type(e).__name__}: {e}".replace("\n", " ")


class TooManyBadFiles(CatalogError):
    """prepare: more songs failed to decode than max_bad allows. The good ones are cached."""

    def __init__(self, message, counts):
        super().__init__(message)
        self.counts = counts


def _as_is(item):  # a module-level function, not a lambda: spawned workers must pickle it
    return item


def prepare(catalog_path, cache_dir, shard=(0, 1), num_workers=0, max_bad=0.01):
    """Compute song_mel for the rows of one shard into the cache. Returns counts.

    Resumable: rows already done (len >= 0) are kept, rows not done or failed before are
    (re)computed; a run killed at any point loses at most FLUSH_SECONDS of work.
    A file that cannot be decoded is skipped and listed in bad-*.csv (song_id, path, reason).
    Only when more than `max_bad` of the shard's rows failed does it raise TooManyBadFiles,
    after the good songs are saved, naming that report (default 1%, like the CLI's --max-bad;
    max_bad=1.0 never raises, for callers that read counts["bad_fraction"] themselves).
    """
    from tqdm import tqdm
    catalog = load_catalog(catalog_path)
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
    if not 0.0 <= max_bad <= 1.0:
        raise ValueError(f"max_bad is a fraction of the songs, 0 to 1; got {max_bad}")
    start, stop = shard_bounds(len(catalog), i, n)
    os.makedirs(cache_dir, exist_ok=True)
    others = {p for p in glob.glob(os.path.join(cache_dir, "meta-*-of-*.json"))
              if not p.endswith(f"-of-{n:05d}.json")}
    if others:
        raise CatalogError(f"{cache_dir}: holds shards of a run with another shard count "
                           f"({os.path.basename(sorted(others)[0])}); use the same n or a new folder")
    meta = {"num_shards": n, "shard": i, "start_row": start, "stop_row": stop,
            "catalog_rows": len(catalog), "catalog_fingerprint": catalog.fingerprint()}
    meta_path = _shard_file(cache_dir, "meta", i, n, "json")
    mel_path = _shard_file(cache_dir, "mel", i, n, "npy")
    len_path = _shard_file(cache_dir, "len", i, n, "npy")
    if os.path.exists(meta_path) and os.path.exists(mel_path) and os.path.exists(len_path):
        if _load_meta(meta_path) != meta:
            raise CatalogError(f"{meta_path}: built for another catalog or shard layout; use another "
                               f"--cache folder or delete this one")
        mels = _open_mels(mel_path, stop - start, mode="r+")
        lengths = _load_lengths(len_path, stop - start)
    else:
        mels = np.lib.format.open_memmap(mel_path, mode="w+", dtype=np.float16,
                                         shape=(stop - start, MAX_FRAMES, N_MELS))
        lengths = np.full(stop - start, NOT_DONE, dtype=np.int32)
        _save_lengths(len_path, lengths)
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)
    todo = [start + k for k in np.flatnonzero(lengths < 0)]
    # one song is too small a job for intra-op threads: with 2+ threads torch's OpenMP workers spin
    # and wait (100x slower when the cores are busy); parallelism comes from --num_workers instead
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kept = (stop - start) - len(todo)
    bad, t0, last_flush = [], time.time(), time.time()
    loader = DataLoader(_DecodeRows(catalog, todo), batch_size=None, num_workers=num_workers,
                        collate_fn=_as_is, prefetch_factor=4 if num_workers else None)
    for done, (row, mel, reason) in enumerate(tqdm(loader, desc=f"prepare {i}/{n}", unit="song",
                                                   disable=None), start=1):
        k = row - start
        if mel is None:
            lengths[k] = FAILED
            bad.append((catalog[row].song_id, catalog[row].audio, reason))
        else:
            mels[k, : len(mel)] = mel
            mels[k, len(mel):] = 0
            lengths[k] = len(mel)
        if time.time() - last_flush > FLUSH_SECONDS or done == len(todo):
            mels.flush()  # slots reach the disk before the lengths that declare them done
            _save_lengths(len_path, lengths)
            last_flush = time.time()
    mels.flush()
    _save_lengths(len_path, lengths)
    torch.set_num_threads(threads)
    bad_path = _shard_file(cache_dir, "bad", i, n, "csv")
    if bad:
        with open(bad_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["song_id", "path", "reason"])
            w.writerows(bad)
    elif os.path.exists(bad_path):
        os.remove(bad_path)  # every earlier failure decoded this time
    dt = time.time() - t0
    bad_fraction = len(bad) / max(stop - start, 1)
    counts = {"rows": stop - start, "kept": kept, "computed": len(todo) - len(bad),
              "failed": len(bad), "bad_fraction": bad_fraction, "report": bad_path if bad else None,
              "seconds": round(dt, 2)}
    print(f"prepare shard {i}/{n} rows [{start}, {stop}): {counts['computed']} computed, {kept} kept "
          f"from an earlier run, {len(bad)} failed" +
          (f" ({bad_fraction:.1%}, max-bad {max_bad:.1%}; see {bad_path})" if bad else "") +
          f"; {dt:.1f} s, {len(todo) / max(dt, 1e-9):.1f} songs/s")
    if bad_fraction > max_bad:
        # the run is over and saved; the error is about the data, so the shell sees a failure
        raise TooManyBadFiles(f"{bad_path}: {len(bad)} of {stop - start} songs ({bad_fraction:.1%}) failed "
                              f"to decode, more than --max-bad {max_bad:.1%}; that file lists each one "
                              f"and why. The other songs are cached: fix or drop the bad files and run "
                              f"prepare again (only the failed rows are retried)", counts)
    return counts


# -----------------------------------------------------------------------------
# Datasets and collator

def _failed_rows(rows, cache, what):
    """Rows whose audio failed to decode in prepare (they have no log-mel); the datasets drop them,
    with a warning, instead of failing mid-epoch in a DataLoader worker."""
    if cache is None:
        return []
    bad = [r for r in rows if not cache.has(r)]
    if bad:
        warnings.warn(f"{cache.cache_dir}: skipping {len(bad)} {what} whose audio failed to decode "
                      f"(rows {bad[:5]}...; see the bad-*.csv files there)")
    return bad


class SongDataset(Dataset):
    """Stage 1: one song -> {"mel": (T, 128) float32, "text": X_t, "row": catalog row}.

    With a cache, songs that failed in prepare are dropped up front (with a warning). Without
    one the audio is decoded on the fly (fine for small sets, slow for big ones), so a bad file
    is only found inside a DataLoader worker; `on_error` says what happens then:
      "raise" (default): CatalogError naming the catalog row, the song, the file and the reason.
               Evaluation needs this: every row must get an embedding, in order.
      "skip":  the item is None, with a warning naming the song and the reason; Collator drops
               None items and warns with the count. For training: one bad file should cost
               one song, not the run. (A pre-scan would decode everything twice.)
    """

    what = "songs"  # for the warning about songs that failed in prepare

    def __init__(self, catalog, rows, cache=None, on_error="raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.catalog, self.cache, self.on_error = catalog, cache, on_error
        bad = set(_failed_rows(rows, cache, self.what))
        self.rows = [r for r in rows if r not in bad]

    def __len__(self):
        return len(self.rows)

    def mel(self, row):
        """(T, 128) log-mel of a catalog row; None when it cannot be decoded and on_error='skip'."""
        if self.cache is not None:
            return self.cache.mel(row)
        song = self.catalog[row]
        try:
            return song_mel(song.audio)
        except Exception as e:  # whatever the decoder raised, the message says which row and why
            msg = (f"{self.catalog.path}: row {row} (song '{song.song_id}'), column 'audio': "
                   f"{type(e).__name__}: {e}")
            if song.audio not in msg:  # AudioError and the OS errors name the file already
                msg += f" ({song.audio})"
            if self.on_error == "skip":
                warnings.warn("skipping " + msg)
                return None
            raise CatalogError(msg) from e

    def __getitem__(self, k):
        row = self.rows[k]
        mel = self.mel(row)
        return None if mel is None else {"mel": mel, "text": self.catalog[row].text, "row": row}


class PairDataset(SongDataset):
    """Stage 2: one (trigger, recommended) pair -> the two songs' mels, texts and rows.
    texts: which songs' texts to include ("trig", "rec"); a text that no loss reads is not
    tokenized (the default stage-2 loss reads the recommended song's only).
    on_error as in SongDataset; with "skip" a pair with a bad song is None."""

    what = "songs (and their pairs)"

    def __init__(self, catalog, pairs, cache=None, on_error="raise", texts=("trig", "rec")):
        super().__init__(catalog, sorted({r for p in pairs for r in p}), cache, on_error)
        usable = set(self.rows)  # the pairs' songs that have a log-mel
        self.pairs = [p for p in pairs if p[0] in usable and p[1] in usable]
        self.texts = tuple(texts)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, k):
        t, r = self.pairs[k]
        trig_mel = self.mel(t)
        rec_mel = None if trig_mel is None else self.mel(r)
        if rec_mel is None:
            return None
        item = {"trig_mel": trig_mel, "rec_mel": rec_mel, "trig_row": t, "rec_row": r}
        for side, row in (("trig", t), ("rec", r)):
            if side in self.texts:
                item[f"{side}_text"] = self.catalog[row].text
        return item


# CrossMuSim's training samples (paper-notes Sec. 2): each text type of a song is its own
# sample, paired with a random audio crop. Every random choice is drawn from a generator seeded
# by (seed, epoch, sample index), so a sample does not depend on which worker builds it or on
# what was drawn before: a resumed run sees exactly the samples of an uninterrupted one.

TEXT_TYPES = ("aspects", "caption", "lyrics")
_ASPECT_SEPARATORS = re.compile(r"\s*[,;|]\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def seconds_to_frames(seconds):
    """Log-mel frames in `seconds` of audio at the 96 ms hop: 10 s -> 104."""
    return int(round(seconds * SAMPLE_RATE)) // HOP_LENGTH


def random_crop(mel, crop_frames, rng):
    """(T, M) -> (min(T, crop_frames), M): a window of crop_frames at a uniform random start;
    a song no longer than the window is returned whole."""
    start = int(rng.integers(0, len(mel) - crop_frames + 1)) if len(mel) > crop_frames else 0
    return mel[start:start + crop_frames]


def split_aspects(value):
    """'rock, loud; guitar' -> ['rock', 'loud', 'guitar'] (comma, semicolon or bar separated)."""
    return [a for a in _ASPECT_SEPARATORS.split(value.strip()) if a]


def sample_aspects(aspects, rng, max_aspects=5):
    """CrossMuSim aspects text: 1..max_aspects distinct keywords in random order, joined by ', '."""
    k = int(rng.integers(1, min(max_aspects, len(aspects)) + 1))
    return ", ".join(aspects[i] for i in rng.permutation(len(aspects))[:k])


def split_sentences(text):
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def sample_caption(sentences, rng):
    """CrossMuSim caption text: the first n sentences, n uniform in 1..len(sentences)."""
    return " ".join(sentences[:int(rng.integers(1, len(sentences) + 1))])


def lyric_lines(lyrics):
    return [line.strip() for line in lyrics.splitlines() if line.strip()]


class CrossMuSimDataset(SongDataset):
    """CrossMuSim training samples: one (song, text type) -> {"mel": (<= crop_frames, 128) random
    crop, "text": that type's text, "row": catalog row}.

    Text types, each drawn afresh on every visit:
      aspects  up to max_aspects random keywords of the song's `aspect_column`,
      caption  a random block of sentences from the start of its `caption_column`,
      lyrics   one random non-empty line of its lyrics.
    A song gets a sample for each type it has text for; a catalog without a column simply has no
    samples of that type, and a song with none of the types falls back to its HTCL text X_t (one
    "song" sample), so nothing is dropped silently. `counts` says how many samples of each type.
    set_epoch(e) changes the draws; within an epoch, sample k is a pure function of (seed, e, k).
    redraw=False keeps epoch 0's draws whatever set_epoch says (Accelerate's loaders call it on
    every pass): held-out samples that are the same at every validation and after a resume.
    """

    def __init__(self, catalog, rows, cache=None, on_error="raise", crop_frames=104, seed=3407,
                 text_types=TEXT_TYPES, aspect_column="aspects", caption_column="caption", max_aspects=5,
                 redraw=True):
        super().__init__(catalog, rows, cache, on_error)
        unknown = set(text_types) - set(TEXT_TYPES)
        if unknown or not text_types:
            raise ValueError(f"text_types must be a non-empty subset of {TEXT_TYPES}, got {tuple(text_types)}")
        self.crop_frames, self.seed, self.max_aspects = crop_frames, seed, max_aspects
        self.redraw, self.epoch = redraw, 0
        self.samples = []  # (row, type, the pieces a text is drawn from)
        for row in self.rows:
            song, before = catalog[row], len(self.samples)
            pieces = {"aspects": split_aspects(catalog.label(row, aspect_column)) if aspect_column in catalog.columns else [],
                      "caption": split_sentences(catalog.label(row, caption_column)) if caption_column in catalog.columns else [],
                      "lyrics": lyric_lines(song.lyrics)}
            self.samples += [(row, t, pieces[t]) for t in text_types if pieces[t]]
            if len(self.samples) == before:
                self.samples.append((row, "song", [song.text]))
        self.counts = {t: sum(s[1] == t for s in self.samples) for t in (*TEXT_TYPES, "song")}

    def set_epoch(self, epoch):
        if self.redraw:
            self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def text(self, kind, pieces, rng):
        if kind == "aspects":
            return sample_aspects(pieces, rng, self.max_aspects)
        if kind == "caption":
            return sample_caption(pieces, rng)
        return pieces[int(rng.integers(len(pieces)))]  # a lyric line, or the one fallback text

    def __getitem__(self, k):
        row, kind, pieces = self.samples[k]
        mel = self.mel(row)
        if mel is None:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, k])
        return {"mel": random_crop(mel, self.crop_frames, rng), "text": self.text(kind, pieces, rng), "row": row}


def _batch_encoder(tokenizer, max_length):
    """A copy of a fast tokenizer's Rust backend set to truncate at max_length and pad to the
    batch's longest, as the wrapper sets it per call (sides and pad ids from the tokenizer);
    None for a tokenizer without one. A copy, so the caller's tokenizer is left as it was."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token is None:  # no pad token: let the wrapper raise its error
        return None
    from tokenizers import Tokenizer
    enc = Tokenizer.from_str(backend.to_str())
    enc.enable_truncation(max_length, direction=tokenizer.truncation_side)
    enc.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                       pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token)
    return enc


class Collator:
    """Batches items of SongDataset or PairDataset.

    *mel  -> (B, T, 128) float32, zero-padded in time to the batch's longest song (at least
             MIN_FRAMES), plus *padding_mask (B, T) bool, True at padded frames.
    *text -> *tokens: the tokenizer's dict (input_ids, attention_mask[, token_type_ids]), padded
             to the batch's longest text (on to a multiple of text_bucket if > 0), truncated at
             max_text_length (BERT: 512); left out with tokenizer None.
    *row  -> LongTensor (B,).
    None items (songs that failed to decode, from a dataset with on_error="skip") are dropped
    with a warning that counts them, so B can be smaller than the batch size. `skipped` counts
    them per process: each DataLoader worker has its own copy and prints its own warnings.
    """
    # NOTE(paper): the released code pads/truncates every song to exactly 1251 frames with the
    # floor value; we pad to the batch max with zeros and hand the model a padding mask, which
    # costs less compute for short songs. The model decides what to do with the mask.

    def __init__(self, tokenizer, max_text_length=512, text_bucket=0):
        self.tokenizer, self.max_text_length = tokenizer, max_text_length
        # > 0: texts padded on to a multiple of text_bucket (at most max_text_length), so that a
        # compiled model sees a few lengths instead of one per batch (pretrain.py --compile)
        self.text_bucket = text_bucket
        self.skipped = 0
        self.encoder = _batch_encoder(tokenizer, max_text_length)

    def tokenize(self, texts):
        """list of str -> the dict tokenizer(texts, padding="longest", truncation=True, max_length=...,
        return_tensors="pt") gives, ~2.5x faster (bench.py): same Rust tokenizer, without the Python
        wrapper's per-call set-up and list conversions."""
        if self.encoder is None:  # a slow (pure-Python) tokenizer: its own call
            tokens = dict(self.tokenizer(texts, padding="longest", truncation=True,
                                         max_length=self.max_text_length, return_tensors="pt"))
        else:
            # encode_batch_fast skips the character offsets nobody here reads: ~20% faster on lyrics
            # that fill 512 tokens (bench.py); tokenizers < 0.20 only has encode_batch
            encode = getattr(self.encoder, "encode_batch_fast", None) or self.encoder.encode_batch
            encs = encode(texts)
            fields = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
            tokens = {name: torch.from_numpy(np.array([getattr(e, fields[name]) for e in encs], dtype=np.int64))
                      for name in self.tokenizer.model_input_names if name in fields}
        L = tokens["input_ids"].shape[1]
        if self.text_bucket and L % self.text_bucket:  # on to the bucket's length, as the tokenizer pads
            to = min(-(-L // self.text_bucket) * self.text_bucket, self.max_text_length)
            side = (0, to - L) if self.tokenizer.padding_side == "right" else (to - L, 0)
            pad = {"input_ids": self.tokenizer.pad_token_id, "token_type_ids": self.tokenizer.pad_token_type_id}
            tokens = {k: F.pad(v, side, value=pad.get(k, 0)) for k, v in tokens.items()}
        return tokens

    def __call__(self, items):
        kept = [it for it in items if it is not None]
        if len(kept) < len(items):
            self.skipped += len(items) - len(kept)
            warnings.warn(f"Collator: dropped {len(items) - len(kept)} of {len(items)} items of this batch "
                          f"whose audio failed to decode ({self.skipped} dropped so far in this process)")
            if not kept:  # nothing to train on; an empty batch would fail later and less clearly
                raise AudioError(f"all {len(items)} songs of this batch failed to decode; see the "
                                 f"'skipping' warnings above (is the audio folder there?)")
        items = kept
        batch = {}
        for key in items[0]:
            values = [it[key] for it in items]
            if key.endswith("mel"):
                lengths = torch.tensor([len(v) for v in values])
                mel = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)  # (B, T_max, 128), zeros
                if mel.shape[1] < MIN_FRAMES:  # a batch of only very short songs
                    mel = F.pad(mel, (0, 0, 0, MIN_FRAMES - mel.shape[1]))  # (B, T, 128)
                batch[key] = mel.float()
                batch[key[: -len("mel")] + "padding_mask"] = torch.arange(mel.shape[1]) >= lengths[:, None]  # (B, T)
            elif key.endswith("text"):
                if self.tokenizer is not None:  # None: audio only (evaluate.py's audio embeddings)
                    batch[key[: -len("text")] + "tokens"] = self.tokenize(values)
            elif key.endswith("row"):
                batch[key] = torch.tensor(values, dtype=torch.long)
            else:
                batch[key] = values
        return batch


# -----------------------------------------------------------------------------
# Command line

def _shard_arg(s):
    try:
        i, n = (int(v) for v in s.split("/"))
        assert n >= 1 and 0 <= i < n
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"--shard wants i/n with 0 <= i < n, like 0/4; got {s!r}") from None
    return i, n


def number_type(low, kind=int, high=None, name=None, open_low=False, open_high=False):
    """An argparse type: a finite number of `kind` in [low, high] (an end left out where open_low /
    open_high); anything else is a one-line usage error naming the flag. The one such check of
    every command line (evaluate.py's and the tools' positive_int etc. are built from it)."""
    name = name or f"{kind.__name__} >= {low}" + (f" and <= {high}" if high is not None else "")

    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            v = None
        if (v is None or not math.isfinite(v) or v < low or (open_low and v == low)
                or (high is not None and (v > high or (open_high and v == high)))):
            raise argparse.ArgumentTypeError(f"expected {name}, got {s!r}")
        return v
    parse.__name__ = name  # argparse names the type in its message
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description="HTCL data: prepare log-mels, mine pairs.",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare", allow_abbrev=False, help="decode songs into the log-mel cache",
                       description="Compute the log-mel of every song of one shard into --cache (resumable).")
    q.add_argument("--catalog", required=True, help="catalog CSV/JSONL")
    q.add_argument("--cache", help="cache folder (memory-mapped, random access: the demo, stage 2, embed)")
    q.add_argument("--shards", help="folder or s3:// / gs:// URL: WebDataset tar shards instead (shards.py; "
                                    "paper-scale stage 1, streamed)")
    q.add_argument("--shard_size_mb", type=number_type(1e-3, float), default=1000.0,  # shards.DEFAULT_SHARD_BYTES
                   help="with --shards: the size of a shard of full 120 s songs, MB (default %(default)g)")
    q.add_argument("--shard", type=_shard_arg, default=(0, 1),
                   help="i/n: this machine's part of n (default 0/1): rows [i*N//n, (i+1)*N//n) of --cache, "
                        "shards [i*S//n, (i+1)*S//n) of --shards; the last part to finish writes index.json")
    q.add_argument("--num_workers", type=number_type(0), default=0, help="decoding processes (default 0: in-process)")
    q.add_argument("--max_bad", "--max-bad", type=number_type(0, float, 1), default=0.01,
                   help="fail (exit 1) when more than this fraction of songs cannot be decoded (default 0.01)")
    q = sub.add_parser("mine-pairs", allow_abbrev=False, help="co-occurrence pairs for HTCL_w_CF",
                       description="Mine (trigger, rec) pairs from users' favourite sequences (Table 2, HTCL_w_CF).")
    q.add_argument("--favourites", required=True, help="user log CSV: user_id,song_id,timestamp")
    q.add_argument("--catalog", required=True, help="catalog CSV/JSONL")
    q.add_argument("--out", required=True, help="output pairs CSV: trigger_song_id,rec_song_id")
    q.add_argument("--window", type=number_type(2), default=5, help="favourites per sliding window (default 5)")
    q.add_argument("--split", default="train", choices=["train", "val", "test", "all"],
                   help="keep pairs whose two songs are in this split (default train, like pairs.csv)")
    q.add_argument("--max_pairs_per_user", type=number_type(1), default=None, help="subsample heavy users (default: no cap)")
    q.add_argument("--seed", type=number_type(0), default=3407)
    q = sub.add_parser("pairs-from-column", allow_abbrev=False, help="stage-2 pairs of songs sharing a column",
                       description="Stage-2 pairs without a user log: songs with the same value of --column "
                                   "(a work or album id), of the train split by default.")
    q.add_argument("--catalog", required=True, help="catalog CSV/JSONL")
    q.add_argument("--column", required=True, help="catalog column whose equal values make pairs, e.g. album_id")
    q.add_argument("--out", required=True, help="output pairs CSV: trigger_song_id,rec_song_id")
    q.add_argument("--split", default="train", choices=["train", "val", "test", "all"],
                   help="keep pairs whose two songs are in this split (default train: what stage 2 trains on)")
    q.add_argument("--max_pairs_per_group", type=number_type(1), default=None, help="seeded sample per value (default: all)")
    q.add_argument("--seed", type=number_type(0), default=3407)
    args = p.parse_args(argv)

    if args.command == "prepare":
        if bool(args.cache) == bool(args.shards):
            p.error("prepare: give one of --cache DIR (memory-mapped cache) or --shards DIR_OR_URL (tar shards)")
        if args.cache:
            prepare(args.catalog, args.cache, args.shard, args.num_workers, args.max_bad)
        else:  # the same song_mel, written as shards
            import shards  # here: shards.py imports this module (as `data`: its errors are not __main__'s)
            try:
                shards.write(args.catalog, args.shards, args.shard, round(args.shard_size_mb * 1e6),
                             args.num_workers, args.max_bad)
            except (shards.data.CatalogError, OSError) as e:
                raise SystemExit(f"error: {e}".replace("\n", " ")) from None
    elif args.command == "mine-pairs":
        catalog = load_catalog(args.catalog)
        pairs = mine_cooccurrence_pairs(load_favourites(args.favourites, catalog), args.window,
                                        args.max_pairs_per_user, args.seed)
        if args.split != "all":
            keep = set(split_rows(catalog, args.split))
            pairs = [(a, b) for a, b in pairs if a in keep and b in keep]
        write_csv(args.out, ["trigger_song_id", "rec_song_id"],
                  [[catalog[a].song_id, catalog[b].song_id] for a, b in pairs])
        print(f"mine-pairs: {len(pairs)} pairs (window {args.window}, split {args.split}) -> {args.out}")
    elif args.command == "pairs-from-column":
        catalog = load_catalog(args.catalog)
        rows = None if args.split == "all" else split_rows(catalog, args.split, seed=args.seed)
        pairs = column_pairs(catalog, args.column, rows, args.max_pairs_per_group, args.seed)
        if not pairs:
            raise CatalogError(f"{args.catalog}: no two songs of split {args.split} share a value of '{args.column}'")
        write_csv(args.out, ["trigger_song_id", "rec_song_id"],
                  [[catalog[a].song_id, catalog[b].song_id] for a, b in pairs])
        print(f"pairs-from-column: {len(pairs)} pairs of songs sharing '{args.column}' (split {args.split}) "
              f"-> {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (CatalogError, OSError) as e:  # a data problem: the message says where; a traceback adds nothing
        raise SystemExit(f"error: {e}")
    except Exception as e:  # --shards on object storage: the client's own errors (missing credentials, ...)
        if not type(e).__module__.startswith(("botocore", "aiobotocore", "google", "aiohttp")):
            raise
        raise SystemExit(f"error: {type(e).__name__}: {e}".replace("\n", " "))
