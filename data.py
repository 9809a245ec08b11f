"""
Data for HTCL: audio front end, song catalog, user-behaviour files, a log-mel cache, the
PyTorch datasets and collator, and a small synthetic "music service" to run everything on.

Paper: Pan et al., "HTCL", ICMR 2025 (arXiv 2505.23298).
  Sec. 2.1 / 3.1.3  input: the first 120 s of a song as a 128-bin log-mel spectrogram
                    (128 ms Hann window, 96 ms hop -> 1251 frames), and the song text X_t
                    (title, artists, lyrics) for BERT.
  Sec. 2.2          stage-2 training pairs <trigger song, recommended song> that users favoured.
  Table 2           HTCL_w_CF: pairs mined from co-occurrence in users' favourite sequences.
CrossMuSim (../shared/paper-notes.md Sec. 2), the stage-1 variant: each text type (aspects,
caption, a lyric line) its own training sample with a random audio crop (CrossMuSimDataset).

Commands:
  python data.py synth --out sample_data --songs 640 --users 250 --seed 3407   # bundled toy world
  python data.py prepare --catalog sample_data/catalog.csv --cache cache/      # log-mels -> .npy
  python data.py prepare --catalog C --cache DIR --shard 3/8 --num_workers 4   # one shard of 8
  python data.py mine-pairs --favourites sample_data/favourites.csv \\
      --catalog sample_data/catalog.csv --out cf_pairs.csv --window 5          # HTCL_w_CF pairs

Read top to bottom: audio -> catalog -> behaviour files -> cache -> datasets -> synthetic world -> CLI.
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
import shutil
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
    """prepare's decode jobs, so a DataLoader can run song_mel in worker processes."""

    def __init__(self, catalog, rows):
        self.items = [(r, catalog[r].audio) for r in rows]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        row, path = self.items[k]
        try:
            return row, song_mel(path).numpy().astype(np.float16), ""
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
             to the batch's longest text, truncated at max_text_length (BERT: 512); left out
             with tokenizer None.
    *row  -> LongTensor (B,).
    None items (songs that failed to decode, from a dataset with on_error="skip") are dropped
    with a warning that counts them, so B can be smaller than the batch size. `skipped` counts
    them per process: each DataLoader worker has its own copy and prints its own warnings.
    """
    # NOTE(paper): the released code pads/truncates every song to exactly 1251 frames with the
    # floor value; we pad to the batch max with zeros and hand the model a padding mask, which
    # costs less compute for short songs. The model decides what to do with the mask.

    def __init__(self, tokenizer, max_text_length=512):
        self.tokenizer, self.max_text_length = tokenizer, max_text_length
        self.skipped = 0
        self.encoder = _batch_encoder(tokenizer, max_text_length)

    def tokenize(self, texts):
        """list of str -> the dict tokenizer(texts, padding="longest", truncation=True, max_length=...,
        return_tensors="pt") gives, ~2.5x faster (bench.py): same Rust tokenizer, without the Python
        wrapper's per-call set-up and list conversions."""
        if self.encoder is None:  # a slow (pure-Python) tokenizer: its own call
            return dict(self.tokenizer(texts, padding="longest", truncation=True,
                                       max_length=self.max_text_length, return_tensors="pt"))
        # encode_batch_fast skips the character offsets nobody here reads: ~20% faster on lyrics
        # that fill 512 tokens (bench.py); tokenizers < 0.20 only has encode_batch
        encode = getattr(self.encoder, "encode_batch_fast", None) or self.encoder.encode_batch
        encs = encode(texts)
        fields = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
        return {name: torch.from_numpy(np.array([getattr(e, fields[name]) for e in encs], dtype=np.int64))
                for name in self.tokenizer.model_input_names if name in fields}

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
# Synthetic world (`python data.py synth`): a tiny music service with known structure.
#
# Songs carry a genre, a language and a hidden taste factor; artists mostly share all three.
#   genre    is audible (timbre = harmonic series, rhythm = tempo + accent pattern + drums)
#            and written (title and lyrics words),
#   language is audible (formant bands of a whispered "voice" in syllables) and written (lyrics),
#   hidden   is audible only (a drone at a factor-specific pitch); no text mentions it.
# Users favour songs mostly by hidden factor, a little by genre, so stage-1 (audio <-> text)
# cannot learn the hidden factor from text and stage-2 (favoured pairs) can: the paper's story.
# Half the favourites come through a "similar songs" channel (recommended from the previous
# song, so they also lean towards its hidden factor and genre), half from taste alone.
# pairs.csv holds the channel's <trigger, favourite> pairs, HTCL's triplets; HTCL_w_CF's pairs
# are mined from the favourites' co-occurrence, both channels alike (`data.py mine-pairs`).

GENRES = {  # timbre: harmonic roll-off k^-r, odd harmonics only; rhythm: bpm, 8th-note accents, note decay (s)
    "ambient":    dict(rolloff=2.4, odd=False, bpm=66, decay=1.00, accents=(1, 0, .5, 0, .8, 0, .4, 0),
                       kick=0.0, hats=0.0, scale=(0, 2, 4, 7, 9)),
    "rock":       dict(rolloff=0.9, odd=False, bpm=124, decay=0.20, accents=(1, .6, .8, .6, 1, .6, .8, .6),
                       kick=0.8, hats=0.3, scale=(0, 3, 5, 7, 10)),
    "jazz":       dict(rolloff=1.6, odd=True, bpm=100, decay=0.35, accents=(1, 0, .7, .5, 0, .8, .6, 0),
                       kick=0.0, hats=0.5, scale=(0, 2, 3, 5, 7, 9, 10)),
    "electronic": dict(rolloff=0.7, odd=True, bpm=128, decay=0.08, accents=(1, .8, 1, .8, 1, .8, 1, .8),
                       kick=1.0, hats=0.6, scale=(0, 2, 3, 5, 7, 8, 10)),
    "folk":       dict(rolloff=1.9, odd=False, bpm=84, decay=0.50, accents=(1, .4, .7, .4, 1, .4, .7, .4),
                       kick=0.0, hats=0.0, scale=(0, 2, 4, 5, 7, 9, 11)),
    "hiphop":     dict(rolloff=1.2, odd=False, bpm=90, decay=0.12, accents=(1, 0, 0, .7, .9, 0, .6, 0),
                       kick=1.0, hats=0.4, scale=(0, 3, 5, 7, 10)),
}
GENRE_WORDS = {
    "ambient": "drift haze ocean still glow breath vapor horizon calm mist float echo".split(),
    "rock": "guitar thunder highway rebel fire stone loud steel riot engine wild road".split(),
    "jazz": "blue smoke velvet swing saxophone midnight cafe brass cool lounge rain bebop".split(),
    "electronic": "neon pulse circuit laser voltage synth chrome digital grid signal rave techno".split(),
    "folk": "river meadow harvest cabin willow lantern barn fiddle valley home wood mountain".split(),
    "hiphop": "street block rhyme flow hustle beat crown city cipher gold corner mic".split(),
}
GENERIC_WORDS = "love night day heart dream light time world you me forever again down up sweet".split()
LANGUAGES = {  # two vowels as (F1, F2, F3) Hz; syllables/s; letters the made-up words are built from
    "kora": dict(vowels=((750, 1250, 2600), (500, 900, 2400)), rate=5.0, consonants="ktrg", letters="ao"),
    "lumi": dict(vowels=((300, 2300, 3000), (350, 800, 2250)), rate=4.0, consonants="lmnh", letters="iu"),
    "sefa": dict(vowels=((550, 1850, 2550), (650, 1650, 3400)), rate=6.0, consonants="sfvz", letters="ea"),
    "dobu": dict(vowels=((400, 1050, 3300), (600, 1400, 2000)), rate=4.5, consonants="dbpw", letters="ou"),
}
# CrossMuSim-style descriptions (aspects = tag keywords, caption = a few sentences), written from a
# song's genre, language and voicing; like the rest of the text they never mention the hidden factor.
GENRE_ASPECTS = {
    "ambient": "calm dreamy slow soft floating atmospheric".split(),
    "rock": "loud energetic guitar driving raw distorted".split(),
    "jazz": "smooth swing saxophone mellow relaxed improvised".split(),
    "electronic": "danceable synth energetic pulsing club futuristic".split(),
    "folk": "warm acoustic fiddle nostalgic gentle rustic".split(),
    "hiphop": "groovy beat urban confident rhymes bouncy".split(),
}
GENRE_SCENES = {
    "ambient": ("sleep", "meditation"), "rock": ("driving", "the gym"), "jazz": ("a late dinner", "a rainy day"),
    "electronic": ("a party", "running"), "folk": ("a campfire", "a slow morning"), "hiphop": ("the street", "a workout"),
}
HIDDEN_DRONE_HZ = (200, 270, 365, 492, 665, 897, 1211)  # hidden factor h -> drone pitch (x1, x1.5, x2)
SYNTH_SECONDS = (3.5, 5.0)  # song durations; 1.5% of songs are 0.8-1.5 s to exercise MIN_FRAMES padding


def _band_noise(rng, n, centers, widths, gains):
    """White noise shaped in the frequency domain by Gaussian bumps: formant-like bands."""
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    shape = sum(g * np.exp(-0.5 * ((f - c) / w) ** 2) for c, w, g in zip(centers, widths, gains))
    return np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * shape, n=n)


def _unit(x):
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def synth_audio(rng, genre, language, hidden, seconds, voiced=True):
    """One synthetic song -> float32 mono waveform at 16 kHz (see the section comment)."""
    g, sr = GENRES[genre], SAMPLE_RATE
    n = int(seconds * sr)
    t = np.arange(n) / sr
    # melody: one note per 8th, pitch from the genre's scale, genre timbre via a wavetable
    step = 60.0 / (g["bpm"] * rng.uniform(0.95, 1.05)) / 2  # tempo jitter +-5%
    k = (t // step).astype(int)
    tin = t - k * step  # time since this 8th-note's onset
    n_steps = k[-1] + 1
    semis = np.array(g["scale"])[rng.integers(0, len(g["scale"]), n_steps)] + 12 * rng.integers(0, 2, n_steps)
    freq = 110.0 * 2 ** (rng.uniform(0, 18) / 12) * 2 ** (semis[k] / 12)  # tonic between A2 and ~D#4
    accents = np.array(g["accents"])[np.arange(n_steps) % 8] * rng.uniform(0.8, 1.0, n_steps)
    env = accents[k] * np.exp(-tin / g["decay"]) * np.minimum(1.0, tin / 0.005)
    harm = np.arange(1, 11)
    amps = harm ** -g["rolloff"] * np.where(g["odd"] & (harm % 2 == 0), 0.1, 1.0)
    u = np.arange(2048) / 2048
    table = (amps[:, None] * np.sin(2 * np.pi * harm[:, None] * u)).sum(0)
    phase = (np.cumsum(freq) / sr) % 1.0
    melody = env * np.interp(phase * 2048, np.arange(2049), np.append(table, table[0]))
    # drums: a falling-pitch kick on each beat, band noise "hats" on each accented 8th
    tb = t % (2 * step)
    kick = np.exp(-tb / 0.1) * np.sin(2 * np.pi * (45 * tb + 75 * 0.03 * (1 - np.exp(-tb / 0.03))))
    hats = _band_noise(rng, n, [4500], [700], [1.0]) * accents[k] * np.exp(-tin / 0.03)
    # voice: whispered vowels of the language (formant bands), in syllables grouped into phrases
    lang = LANGUAGES[language]
    voice = np.zeros(n)
    if voiced:
        jitter = rng.uniform(0.96, 1.04)  # the singer's vocal tract length
        envs = [np.zeros(n), np.zeros(n)]
        rate = lang["rate"] * rng.uniform(0.9, 1.1)
        s, phrase_end = rng.uniform(0, 0.5), 0.0
        while s < seconds:
            if s > phrase_end:  # phrases of 1.5-3 s separated by 0.3-1 s rests
                phrase_end = s + rng.uniform(1.5, 3.0)
            m = int(0.7 / rate * sr)  # syllable length
            a = int(s * sr)
            b = min(n, a + m)
            envs[rng.integers(0, 2)][a:b] += np.hanning(m)[: b - a]
            s += 1.0 / rate * rng.uniform(0.85, 1.15)
            if s > phrase_end:
                s += rng.uniform(0.3, 1.0)
        for v, e in zip(lang["vowels"], envs):
            voice += e * _band_noise(rng, n, np.array(v) * jitter, (90, 120, 150), (1.0, 0.6, 0.35))
    # hidden factor: a drone (root, fifth, octave) at a factor-specific pitch, slowly swelling
    # in one stretch covering 40-100% of the song, quiet, and detuned up to +-5% (classes are 35%
    # apart), so it is audible but not the loudest thing in the mix
    c = HIDDEN_DRONE_HZ[hidden] * rng.uniform(0.95, 1.05)
    ph = rng.uniform(0, 2 * np.pi, 3)
    drone = (np.sin(2 * np.pi * c * t + ph[0]) + 0.5 * np.sin(2 * np.pi * 1.5 * c * t + ph[1])
             + 0.35 * np.sin(2 * np.pi * 2 * c * t + ph[2]))
    drone *= 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t)
    span = rng.uniform(0.4, 1.0) * seconds
    on = rng.uniform(0, seconds - span)
    drone *= np.clip(np.minimum(t - on, on + span - t) / 0.3, 0, 1)  # 0.3 s fade in and out
    gain = lambda: rng.uniform(0.7, 1.3)  # per-song mix randomness  # noqa: E731
    x = (_unit(melody) * gain() + _unit(kick) * g["kick"] * 0.8 * gain()
         + _unit(hats) * g["hats"] * 0.5 * gain() + (_unit(voice) * 0.7 * gain() if voiced else 0)
         + _unit(drone) * 0.25 * gain())
    # background noise, pink-ish (1/sqrt f amplitude), at 15-30 dB SNR
    f = np.fft.rfftfreq(n, 1 / sr)
    noise = _unit(np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) / np.sqrt(np.maximum(f, 20)), n=n))
    x = x + noise * np.sqrt(np.mean(x ** 2)) * 10 ** (-rng.uniform(15, 30) / 20)
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.02)
    x = x * fade
    return (x / (np.abs(x).max() + 1e-12) * rng.uniform(0.3, 0.9)).astype(np.float32)


def _made_up_word(rng, lang, syllables):
    L = LANGUAGES[lang]
    return "".join(rng.choice(list(L["consonants"])) + rng.choice(list(L["letters"])) for _ in range(syllables))


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _softmax(logits):
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _synth_description(rng, genre, language, voiced):
    """[aspects, caption] of one synthetic song: the genre and 2-4 of its aspect words as tags, and
    2-3 short sentences (sound, voice, scene)."""
    words = GENRE_ASPECTS[genre]
    picked = [words[j] for j in rng.permutation(len(words))[:int(rng.integers(2, 5))]]
    aspects = [genre] + picked + ([] if voiced else ["instrumental"])
    article = "An" if picked[0][0] in "aeiou" else "A"
    sentences = [f"{article} {picked[0]} {genre} track with a {picked[1]} feel."]
    sentences.append(f"The vocals are in {language}." if voiced else "There are no vocals.")
    if rng.random() < 0.5:
        sentences.append(f"Good for {GENRE_SCENES[genre][int(rng.integers(2))]}.")
    return [", ".join(aspects), " ".join(sentences)]


def synth(out, songs=640, users=250, seed=3407, artists=60, max_pairs=4000):
    """Write the synthetic world to `out`: catalog.csv + audio/, favourites.csv, pairs.csv,
    impressions.csv, artist_graph.csv, artist_split.csv and tiny-bert/ (BERT config + WordPiece
    tokenizer trained on the song texts). Everything derives from `seed`; a rerun is byte-identical.
    audio/ is emptied first; other files in `out` are left alone."""
    rng = np.random.default_rng(seed)
    genres, languages = list(GENRES), list(LANGUAGES)
    G, Lg, H, N, A = len(genres), len(languages), len(HIDDEN_DRONE_HZ), songs, artists

    # artists: one genre (balanced), one language (skewed, like a real catalog), one hidden factor
    a_genre = rng.permutation(np.arange(A) % G)
    a_lang = rng.choice(Lg, A, p=[0.35, 0.3, 0.2, 0.15])
    a_hidden = rng.integers(0, H, A)  # independent of genre, so text cannot reveal it via genre
    names, a_name = set(), []
    for a in range(A):
        while True:
            name = " ".join(_made_up_word(rng, languages[a_lang[a]], int(rng.integers(2, 4))).capitalize()
                            for _ in range(int(rng.integers(1, 3))))
            if name not in names:
                names.add(name)
                a_name.append(name)
                break

    # songs: every artist gets >= 3 (when there are enough songs), the rest follow artist popularity
    base = np.repeat(np.arange(A), 3) if N >= 3 * A else np.empty(0, int)
    s_artist = rng.permutation(np.concatenate([base, rng.choice(A, N - len(base), p=rng.dirichlet(np.full(A, 2.0)))]))
    keep = lambda own, p, K: np.where(rng.random(N) < p, own, rng.integers(0, K, N))  # noqa: E731
    s_genre = keep(a_genre[s_artist], 0.85, G)
    s_lang = keep(a_lang[s_artist], 0.9, Lg)
    s_hidden = keep(a_hidden[s_artist], 0.8, H)
    s_voiced = rng.random(N) >= 0.05  # 5% instrumentals: no voice, empty lyrics
    s_pop = rng.normal(0, 0.5, N)     # log popularity
    s_split = np.empty(N, dtype=object)
    for gi in range(G):  # stratified by genre: 80/10/10
        rows = rng.permutation(np.flatnonzero(s_genre == gi))
        n_tr, n_va = int(round(0.8 * len(rows))), int(round(0.1 * len(rows)))
        s_split[rows[:n_tr]], s_split[rows[n_tr:n_tr + n_va]], s_split[rows[n_tr + n_va:]] = "train", "val", "test"

    # audio: mostly 16 kHz mono MP3 (CBR 16 kbps: small, and byte-deterministic unlike OGG, whose
    # stream serial number is random); a few FLAC at 22.05 kHz and stereo WAV at 44.1 kHz so the
    # decoder, downmix and resampler paths are exercised.
    os.makedirs(out, exist_ok=True)
    shutil.rmtree(os.path.join(out, "audio"), ignore_errors=True)
    os.makedirs(os.path.join(out, "audio"))
    catalog_rows, texts = [], []
    for i in range(N):
        srng = np.random.default_rng([seed, i])  # per-song stream: audio independent of the rest
        kind = "flac" if i % 64 == 7 else "wav" if i % 211 == 100 else "mp3"  # 1 in 64, 1 in 211
        seconds = srng.uniform(0.8, 1.5) if srng.random() < 0.015 else srng.uniform(*SYNTH_SECONDS)
        seconds = min(seconds, {"flac": 3.0, "wav": 1.5, "mp3": seconds}[kind])  # lossless: keep short
        genre, lang = genres[s_genre[i]], languages[s_lang[i]]
        x = synth_audio(srng, genre, lang, int(s_hidden[i]), seconds, bool(s_voiced[i]))
        sid = f"s{i + 1:04d}"
        if kind == "flac":
            audio = f"audio/{sid}.flac"
            sf.write(os.path.join(out, audio), soxr.resample(x, SAMPLE_RATE, 22050), 22050, subtype="PCM_16")
        elif kind == "wav":
            audio = f"audio/{sid}.wav"
            y = soxr.resample(x, SAMPLE_RATE, 44100)
            sf.write(os.path.join(out, audio), np.stack([y * 1.1, y * 0.9], 1).clip(-1, 1), 44100, subtype="PCM_16")
        else:
            audio = f"audio/{sid}.mp3"
            sf.write(os.path.join(out, audio), x, SAMPLE_RATE, format="MP3", subtype="MPEG_LAYER_III",
                     compression_level=0.95, bitrate_mode="CONSTANT")
        # text: genre and language are written, the hidden factor never is
        gw = GENRE_WORDS[genre]
        title = " ".join(rng.choice(gw) if rng.random() < 0.5 else rng.choice(GENERIC_WORDS)
                         for _ in range(int(rng.integers(1, 4)))).title()
        artist_str = a_name[s_artist[i]]
        if rng.random() < 0.1:  # a featured artist of the same genre
            artist_str += ", " + a_name[rng.choice(np.flatnonzero(a_genre == a_genre[s_artist[i]]))]
        lyrics = ""
        if s_voiced[i]:
            lyrics = "\n".join(" ".join(rng.choice(gw) if rng.random() < 0.2 else
                                        _made_up_word(rng, lang, int(rng.integers(1, 4)))
                                        for _ in range(int(rng.integers(3, 8))))
                               for _ in range(int(rng.integers(2, 5))))
        catalog_rows.append([sid, audio, title, artist_str, lyrics, genre, lang, f"h{s_hidden[i]}",
                             f"a{s_artist[i] + 1:03d}", s_split[i]])
        texts.append(Song(sid, audio, title, artist_str, lyrics).text)
    # CrossMuSim columns from a generator of their own, so every other file stays byte-identical
    arng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(12,)))
    for i, row in enumerate(catalog_rows):
        row += _synth_description(arng, genres[s_genre[i]], languages[s_lang[i]], bool(s_voiced[i]))
    _write_csv(os.path.join(out, "catalog.csv"), ["song_id", "audio", "title", "artists", "lyrics", "genre",
                                                  "language", "hidden_factor", "artist_id", "split",
                                                  "aspects", "caption"], catalog_rows)

    # users: a strong hidden-factor taste and a weak genre taste; 35-60 favourites each. Half the
    # favourites come from a "similar songs" channel: songs recommended from the previous song
    # (the trigger), so they also lean towards it; the other half from the user's taste alone.
    a_pref, b_pref = 0.7, 4.0  # b >> a: ~90% of a user's favourites carry their hidden factor
    favs, fav_rows, similar_pairs = [], [], []
    for u in range(users):
        uid, ug, uh = f"u{u + 1:04d}", rng.integers(0, G), rng.integers(0, H)
        taste = a_pref * (s_genre == ug) + b_pref * (s_hidden == uh) + s_pop
        ts, prev, chosen = 1_700_000_000 + int(rng.integers(0, 7 * 86400)), None, np.zeros(N, bool)
        for _ in range(min(int(rng.integers(35, 61)), N - 1)):
            logits = taste.copy()
            similar = prev is not None and rng.random() < 0.5
            if similar:
                logits += 1.5 * (s_hidden == s_hidden[prev]) + 0.5 * (s_genre == s_genre[prev])
            logits[chosen] = -np.inf
            song = int(rng.choice(N, p=_softmax(logits)))
            if similar:
                similar_pairs.append((prev, song))
            prev = song
            chosen[prev] = True
            ts += int(rng.exponential(3 * 3600)) + 30
            favs.append((uid, prev, float(ts)))
            fav_rows.append([uid, f"s{prev + 1:04d}", ts])
    _write_csv(os.path.join(out, "favourites.csv"), ["user_id", "song_id", "timestamp"], fav_rows)

    # stage-2 pairs: HTCL's <trigger, recommended, favoured> triplets are the similar-songs
    # channel's (trigger, favourite) pairs, both songs in train, capped at max_pairs. Co-occurrence
    # of favourites (which HTCL_w_CF mines) also pairs songs favoured for the user's taste alone.
    # NOTE: earlier versions wrote consecutive favourites of both channels here, themselves a
    # co-occurrence (window 2), so HTCL and HTCL_w_CF differed only in the window. The draw the
    # cap made on those is still made, and the cap on these draws from a generator of its own,
    # so impressions.csv and the artist graph stay byte-identical.
    train = s_split == "train"
    consecutive = [p for p in mine_cooccurrence_pairs(favs, window=2) if train[p[0]] and train[p[1]]]
    if len(consecutive) > max_pairs:
        rng.choice(len(consecutive), max_pairs, replace=False)
    pairs = [p for p in similar_pairs if train[p[0]] and train[p[1]]]
    if len(pairs) > max_pairs:
        prng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(13,)))
        pairs = [pairs[k] for k in np.sort(prng.choice(len(pairs), max_pairs, replace=False))]
    _write_csv(os.path.join(out, "pairs.csv"), ["trigger_song_id", "rec_song_id"],
               [[f"s{a + 1:04d}", f"s{b + 1:04d}"] for a, b in pairs])

    # impressions for DIN (CTR: days 1-7 train, day 8 test): half personalised, half random songs;
    # clicks follow taste; favouring a clicked song follows the hidden factor much more.
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    imp_rows = []
    for u in range(users):
        uid = f"u{u + 1:04d}"
        ug, uh = rng.integers(0, G), rng.integers(0, H)  # impressions users are a fresh draw of tastes
        p_user = _softmax(a_pref * (s_genre == ug) + b_pref * (s_hidden == uh) + s_pop)
        for day in range(1, 9):
            k = int(rng.integers(8, 17))
            songs_today = np.where(rng.random(k) < 0.5, rng.choice(N, k, p=p_user), rng.integers(0, N, k))
            for s in songs_today:
                gm, hm = float(s_genre[s] == ug), float(s_hidden[s] == uh)
                clicked = rng.random() < sig(-1.5 + 0.7 * gm + 1.3 * hm + 0.3 * s_pop[s])
                favoured = clicked and rng.random() < sig(-1.0 + 2.0 * hm + 0.3 * gm)
                imp_rows.append([uid, f"s{s + 1:04d}", day, int(clicked), int(favoured)])
    _write_csv(os.path.join(out, "impressions.csv"), ["user_id", "song_id", "day", "clicked", "favoured"], imp_rows)

    # artist graph ("similar to", like AllMusic/OLGA): likelier for a shared genre or hidden factor
    edges = []
    for a in range(A):
        for b in range(a + 1, A):
            p = 0.03 + 0.3 * (a_genre[a] == a_genre[b]) + 0.45 * (a_hidden[a] == a_hidden[b])
            if rng.random() < p:
                edges.append([f"a{a + 1:03d}", f"a{b + 1:03d}"])
    _write_csv(os.path.join(out, "artist_graph.csv"), ["artist_a", "artist_b"], edges)
    # 60/20/20 so the val and test artists have enough edges among themselves to score NDCG
    order = rng.permutation(A)
    a_split = np.where(np.arange(A) < 0.6 * A, "train", np.where(np.arange(A) < 0.8 * A, "val", "test"))
    _write_csv(os.path.join(out, "artist_split.csv"), ["artist_id", "split"],
               sorted([f"a{order[j] + 1:03d}", a_split[j]] for j in range(A)))

    # tiny BERT: config + WordPiece vocab from the song texts (no weights: the model is built from
    # the config). NOTE: tokenizers' WordPieceTrainer breaks ties in hash-map order, so its vocab
    # changes from run to run; instead the vocab is every character (word-initial and "##"
    # continuation) plus the words seen at least twice, most frequent first, using the same BERT
    # normalizer and pre-tokenizer. WordPiece then spells rarer words out in characters.
    from collections import Counter
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertConfig, BertTokenizer
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for text in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    frequent = [w for w, c in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])) if c >= 2 and len(w) > 1]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + frequent
    vocab = {w: i for i, w in enumerate(tokens[:4000])}
    bert_dir = os.path.join(out, "tiny-bert")
    shutil.rmtree(bert_dir, ignore_errors=True)
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    tok.model_max_length = 512
    tok.save_pretrained(bert_dir)
    BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=128, max_position_embeddings=512).save_pretrained(bert_dir)

    counts = {"songs": N, "artists": A, "users": users, "favourites": len(fav_rows), "pairs": len(pairs),
              "impressions": len(imp_rows), "artist_edges": len(edges), "vocab": len(vocab)}
    print(f"synth -> {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return counts


# -----------------------------------------------------------------------------
# Command line

def _shard_arg(s):
    try:
        i, n = (int(v) for v in s.split("/"))
        assert n >= 1 and 0 <= i < n
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"--shard wants i/n with 0 <= i < n, like 0/4; got {s!r}") from None
    return i, n


def main(argv=None):
    p = argparse.ArgumentParser(description="HTCL data: prepare log-mels, mine pairs, make the toy world.",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("prepare", allow_abbrev=False, help="decode songs into the log-mel cache",
                       description="Compute the log-mel of every song of one shard into --cache (resumable).")
    q.add_argument("--catalog", required=True, help="catalog CSV/JSONL")
    q.add_argument("--cache", required=True, help="cache folder")
    q.add_argument("--shard", type=_shard_arg, default=(0, 1), help="i/n: rows [i*N//n, (i+1)*N//n) (default 0/1)")
    q.add_argument("--num_workers", type=int, default=0, help="decoding processes (default 0: in-process)")
    q.add_argument("--max_bad", "--max-bad", type=float, default=0.01,
                   help="fail (exit 1) when more than this fraction of songs cannot be decoded (default 0.01)")
    q = sub.add_parser("mine-pairs", allow_abbrev=False, help="co-occurrence pairs for HTCL_w_CF",
                       description="Mine (trigger, rec) pairs from users' favourite sequences (Table 2, HTCL_w_CF).")
    q.add_argument("--favourites", required=True, help="user log CSV: user_id,song_id,timestamp")
    q.add_argument("--catalog", required=True, help="catalog CSV/JSONL")
    q.add_argument("--out", required=True, help="output pairs CSV: trigger_song_id,rec_song_id")
    q.add_argument("--window", type=int, default=5, help="favourites per sliding window (default 5)")
    q.add_argument("--split", default="train", choices=["train", "val", "test", "all"],
                   help="keep pairs whose two songs are in this split (default train, like pairs.csv)")
    q.add_argument("--max_pairs_per_user", type=int, default=None, help="subsample heavy users (default: no cap)")
    q.add_argument("--seed", type=int, default=3407)
    q = sub.add_parser("synth", allow_abbrev=False, help="write the synthetic world",
                       description="Write the seeded synthetic catalog, audio, user logs and tiny BERT.")
    q.add_argument("--out", required=True, help="output folder (its audio/ and tiny-bert/ are replaced)")
    q.add_argument("--songs", type=int, default=640)
    q.add_argument("--users", type=int, default=250)
    q.add_argument("--seed", type=int, default=3407)
    q.add_argument("--artists", type=int, default=60)
    q.add_argument("--max_pairs", type=int, default=4000, help="cap on pairs.csv rows")
    args = p.parse_args(argv)

    if args.command == "prepare":
        prepare(args.catalog, args.cache, args.shard, args.num_workers, args.max_bad)
    elif args.command == "mine-pairs":
        catalog = load_catalog(args.catalog)
        pairs = mine_cooccurrence_pairs(load_favourites(args.favourites, catalog), args.window,
                                        args.max_pairs_per_user, args.seed)
        if args.split != "all":
            keep = set(split_rows(catalog, args.split))
            pairs = [(a, b) for a, b in pairs if a in keep and b in keep]
        _write_csv(args.out, ["trigger_song_id", "rec_song_id"],
                   [[catalog[a].song_id, catalog[b].song_id] for a, b in pairs])
        print(f"mine-pairs: {len(pairs)} pairs (window {args.window}, split {args.split}) -> {args.out}")
    elif args.command == "synth":
        synth(args.out, args.songs, args.users, args.seed, args.artists, args.max_pairs)


if __name__ == "__main__":
    try:
        main()
    except CatalogError as e:  # a data problem: the message says where; a traceback adds nothing
        raise SystemExit(f"error: {e}")
