"""
Paper-scale log-mel shards for stage-1 pretraining, streamed from a folder or object storage.

Paper: Pan et al., "HTCL", ICMR 2025, Sec. 2.1 / 3.1.3: stage 1 pretrains on 50M full songs, each
the first 120 s as a 128-bin log-mel (1251 frames) with its text X_t. In fp16 that is 320,256 bytes
a song, 16 TB in all: too big for data.py's memory-mapped cache on one disk, so it is written once
into tar shards on object storage and streamed by every training process.

Format: WebDataset tar shards (plain tar; a sample is the members sharing a key, written by the
standard library so the bytes are deterministic, read by webdataset's own reader too):
  {out}/shard-000012.tar     per sample KEY (the catalog row, 9 digits):
                               KEY.json     {song_id, row, frames, text (X_t), catalog (the row's
                                            columns as written), mel_hash}
                               KEY.mel.npy  float16 (frames, 128), only the real frames
  {out}/shard-000012.json    sidecar written after the tar: samples, bytes, failed songs (why) and rows
  {out}/index-part-00000-of-00004.json  one per --shard i/n part; `merge` joins them into
  {out}/index.json           the shards, sample counts, failed rows, bytes, layout, mel-settings hash
  {out}/bad-part-00000-of-00004.csv     song_id,path,reason for audio that failed to decode
Layout: the catalog rows in a seeded permutation, cut into shards of rows_per_shard rows
(shard_bytes / a full song's bytes), so shard k always holds the same rows. The permutation is so
that a batch's songs are not neighbours in the catalog (an artist's songs often are), which would
put near-duplicates among the in-batch negatives. Writing is resumable: a shard whose sidecar
exists is done (tar and sidecar each appear atomically: temp name + rename locally, one put on
object storage), so a rerun after kill -9 redoes at most the shards in flight. Songs that failed
to decode stay out of a finished shard (with ~1% bad files nearly every shard has one, so retrying
them on every rerun would rewrite everything); delete a shard's sidecar to write it again.

Users: data.py prepare --shards writes, pretrain.py --shards trains on, evaluate.py embed --shards
(evals/embed_shards.py, ShardSongs: each rank its own shards) embeds from the shards.

Reader (ShardDataset), one stream per (rank, DataLoader worker), G = world_size x num_workers:
  epoch e: the shards in a permutation seeded by (seed, e) are laid end to end; stream g takes
    positions [g*L, (g+1)*L), L = floor(total / (G*B)) * B, so every stream (and so every rank)
    yields the same number of full batches; the < G*B samples past G*L are dropped (`dropped`,
    different ones each epoch).
  shuffle: the stream is cut into windows of shuffle_buffer samples and each window is yielded in
    a permutation seeded by (seed, e, g, window). A window holds raw fp16 bytes (shuffle_buffer x
    320 KB per worker at paper size).
  exact resume: DataLoader hands out batches round robin, so after c batches of an epoch the
    stream of worker s has yielded ceil((c - s) / W) batches, and batch c is stream c % W's. A new
    DataLoader starts at worker 0, so set_epoch(e, start_batch=c) gives worker w stream (w + c) % W
    and makes it jump to its window (whole shards skipped from the index's counts, free), read through the start of
    that shard without decoding (at most one shard) and skip inside the window's permutation.
    The checkpoint stores the epoch, the batches consumed in it, and plan() (checked on resume).
Local folders, s3:// (s3fs; endpoint from AWS_ENDPOINT_URL or storage_options), gs:// (gcsfs) and
http(s):// (read only) all go through fsspec.

Commands (writing goes through data.py prepare, the one entry for decoding songs; it calls write()
with data.song_mel, the one decode -> log-mel path):
  python data.py prepare --catalog C --shards DIR_OR_URL [--shard i/n] [--shard_size_mb MB] [--num_workers K]
  python shards.py merge --out DIR_OR_URL      # by hand; the last --shard i/n to finish merges itself
  python shards.py info URL
  python shards.py bench URL --batch_size 100 --num_workers 4 --batches 50 [--cold]
"""

import argparse
import contextlib
import csv
import gc
import glob
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import data

FORMAT, FORMAT_VERSION = "htcl-mel-shards", 1
MEL_VERSION = 1  # bump when song_mel changes in a way the constants below do not show
SONG_BYTES = data.MAX_FRAMES * data.N_MELS * 2  # 320,256: one full 120 s song in fp16
SAMPLE_OVERHEAD = 4096  # per sample: 3 tar headers and padding, the npy header, the json (an estimate)
DEFAULT_SHARD_BYTES = 10 ** 9


class ShardError(data.CatalogError):
    """A problem with shards or their index; the message (one line) names the file and says why."""


def mel_settings():
    return {"sample_rate": data.SAMPLE_RATE, "n_fft": data.N_FFT, "hop_length": data.HOP_LENGTH,
            "n_mels": data.N_MELS, "max_frames": data.MAX_FRAMES, "top_db": data.TOP_DB,
            "version": MEL_VERSION}


def _hash(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def mel_hash():
    """Hash of the log-mel settings: shards written with other settings are refused."""
    return _hash(mel_settings())


# -----------------------------------------------------------------------------
# Storage: local folders and URLs through fsspec

def _fs(url, storage_options=None, write=False):
    import fsspec
    if write and re.match(r"https?://", str(url)):
        raise ShardError(f"{url}: http(s) is read-only; write to a folder, s3:// or gs:// and serve that")
    try:
        fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs installed
        raise ShardError(f"{url}: {e}".replace("\n", " ")) from None
    return fs, root.rstrip("/") or "/"


def _is_local(fs):
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@contextlib.contextmanager
def _atomic(fs, root, name):
    """A file object for {root}/{name} that appears there whole or not at all: locally a temp name
    renamed when complete, on object storage a finished local file sent with one put."""
    final = f"{root}/{name}"
    if _is_local(fs):
        tmp = f"{root}/.{name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        with tempfile.NamedTemporaryFile(suffix="-" + name) as f:
            yield f
            f.flush()
            fs.put_file(f.name, final)


def _put_json(fs, root, name, obj):
    with _atomic(fs, root, name) as f:
        f.write(json.dumps(obj, indent=1).encode())


def _get_json(fs, path, missing=None):
    """JSON file -> object; `missing` (a message) when absent, else None is returned."""
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        if missing:
            raise ShardError(missing) from None
        return None
    except (ValueError, OSError) as e:
        raise ShardError(f"{path}: unreadable ({e})".replace("\n", " ")) from None


def drop_page_cache(path):
    """Evict a local folder's files from the page cache (fsync, then POSIX_FADV_DONTNEED), so the
    next read comes from the disk: a cold-cache benchmark without root."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -----------------------------------------------------------------------------
# Writing

def plan_layout(catalog, shard_bytes=DEFAULT_SHARD_BYTES, seed=3407):
    """-> (layout dict, write order). Shard k holds order[k*R:(k+1)*R], R = rows_per_shard."""
    if shard_bytes < 1:
        raise ShardError(f"--shard_size_mb must be positive, got shard_bytes {shard_bytes}")
    rows = max(1, int(shard_bytes) // (SONG_BYTES + SAMPLE_OVERHEAD))
    layout = {"format": FORMAT, "format_version": FORMAT_VERSION, "mel_settings": mel_settings(),
              "mel_hash": mel_hash(), "catalog_rows": len(catalog),
              "catalog_fingerprint": catalog.fingerprint(), "shard_bytes": int(shard_bytes),
              "rows_per_shard": rows, "num_shards": math.ceil(len(catalog) / rows), "seed": seed}
    return layout, np.random.default_rng(seed).permutation(len(catalog))


def _shard_name(k, ext="tar"):
    return f"shard-{k:06d}.{ext}"


def _part_name(kind, i, n, ext):
    return f"{kind}-part-{i:05d}-of-{n:05d}.{ext}"


def _tar_add(tar, name, payload):
    info = tarfile.TarInfo(name)  # fixed metadata: the same songs give the same bytes
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    tar.addfile(info, io.BytesIO(payload))


def _sample_json(catalog, row, frames):
    song = catalog[row]
    columns = {c: catalog.raw_audio[row] if c == "audio" else catalog.label(row, c) for c in catalog.columns}
    return {"song_id": song.song_id, "row": row, "frames": frames, "text": song.text,
            "catalog": columns, "mel_hash": mel_hash()}


def _write_shard(fs, root, k, catalog, decoded, layout_hash):
    """Stream decoded (row, mel, reason) items into shard k; then its sidecar. -> the sidecar."""
    samples, failed, failed_rows = 0, [], []
    with _atomic(fs, root, _shard_name(k)) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row, mel, reason in decoded:
                if mel is None:
                    failed.append([catalog[row].song_id, catalog[row].audio, reason])
                    failed_rows.append(row)
                    continue
                buf = io.BytesIO()
                np.save(buf, mel, allow_pickle=False)
                key = f"{row:09d}"
                _tar_add(tar, key + ".json", json.dumps(_sample_json(catalog, row, len(mel))).encode())
                _tar_add(tar, key + ".mel.npy", buf.getvalue())
                samples += 1
        nbytes = f.tell()
    side = {"shard": k, "name": _shard_name(k), "samples": samples, "bytes": nbytes, "failed": failed,
            "failed_rows": failed_rows, "layout_hash": layout_hash}
    _put_json(fs, root, _shard_name(k, "json"), side)
    return side


def _done_shards(fs, root, ks, layout_hash):
    """Sidecars of the shards already written by an earlier run, checked to be of this layout."""
    done = {}
    for k in ks:
        path = f"{root}/{_shard_name(k, 'json')}"
        side = _get_json(fs, path)
        if side is not None:
            if side.get("layout_hash") != layout_hash:
                raise ShardError(f"{path}: written for another catalog, --shard_size_mb, seed or mel "
                                 f"settings than this run; use another --shards or delete it")
            done[k] = side
    return done


def write(catalog_path, out, part=(0, 1), shard_bytes=DEFAULT_SHARD_BYTES, num_workers=0, max_bad=0.01,
          seed=3407, storage_options=None, mel_fn=data.song_mel):
    """Write this part's shards (resumable) and its part index; with one part also index.json.
    mel_fn(audio path) -> (frames, 128) log-mel (data.song_mel; tests and benchmarks pass fakes).
    Returns counts. Raises TooManyBadFiles (after saving) when more than max_bad failed."""
    from tqdm import tqdm
    catalog = data.load_catalog(catalog_path)
    i, n = part
    if not (n >= 1 and 0 <= i < n) or not 0.0 <= max_bad <= 1.0:
        raise ShardError(f"part must be i/n with 0 <= i < n and max_bad in [0, 1]; got {i}/{n}, {max_bad}")
    layout, order = plan_layout(catalog, shard_bytes, seed)
    layout_hash, R, S = _hash(layout), layout["rows_per_shard"], layout["num_shards"]
    fs, root = _fs(out, storage_options, write=True)
    fs.makedirs(root, exist_ok=True)
    others = [p for p in fs.glob(f"{root}/index-part-*-of-*.json") if not p.endswith(f"-of-{n:05d}.json")]
    if others:
        raise ShardError(f"{out}: holds parts of a run with another part count ({os.path.basename(others[0])}); "
                         f"use the same n or another --shards")
    ks = range(i * S // n, (i + 1) * S // n)
    if _is_local(fs):  # temp files of this part's shards that a killed run left behind
        for tmp in glob.glob(os.path.join(root, ".shard-*.tmp-*")):
            if int(re.search(r"shard-(\d+)", tmp).group(1)) in ks:
                os.remove(tmp)
    done = _done_shards(fs, root, ks, layout_hash)
    todo = [k for k in ks if k not in done]
    threads, t0 = torch.get_num_threads(), time.time()
    torch.set_num_threads(1)  # one song is too small for intra-op threads; workers give parallelism
    rows = [r for k in todo for r in order[k * R:(k + 1) * R]]
    loader = DataLoader(data._DecodeRows(catalog, rows, mel_fn), batch_size=None, num_workers=num_workers,
                        collate_fn=data._as_is, prefetch_factor=4 if num_workers else None)
    decoded = iter(tqdm(loader, desc=f"write {i}/{n}", unit="song", disable=None))
    try:
        for k in todo:
            m = len(order[k * R:(k + 1) * R])
            done[k] = _write_shard(fs, root, k, catalog, (next(decoded) for _ in range(m)), layout_hash)
    finally:
        torch.set_num_threads(threads)
    return _finish_part(fs, root, out, layout, [done[k] for k in ks], part, len(todo), time.time() - t0, max_bad)


class TooManyBadFiles(ShardError):
    """write: more songs failed to decode than max_bad allows. The good ones are in the shards."""


def _finish_part(fs, root, out, layout, sides, part, written, seconds, max_bad):
    i, n = part
    failed = [[s["shard"], *f] for s in sides for f in s["failed"]]
    bad_name = _part_name("bad", i, n, "csv")
    if failed:
        buf = io.StringIO()
        csv.writer(buf).writerows([["shard", "song_id", "path", "reason"], *failed])
        with _atomic(fs, root, bad_name) as f:
            f.write(buf.getvalue().encode())
    elif fs.exists(f"{root}/{bad_name}"):
        fs.rm(f"{root}/{bad_name}")  # every earlier failure decoded this time
    # failed_rows: a reader of a subset of the rows (the train split) counts each shard's samples from them
    entries = [{k: s[k] for k in ("shard", "name", "samples", "bytes")}
               | {"failed": len(s["failed"]), "failed_rows": s.get("failed_rows")} for s in sides]
    _put_json(fs, root, _part_name("index", i, n, "json"), {**layout, "part": [i, n], "shards": entries})
    rows = sum(s["samples"] + len(s["failed"]) for s in sides)
    counts = {"shards": len(sides), "written": written, "kept": len(sides) - written,
              "samples": sum(s["samples"] for s in sides), "failed": len(failed),
              "bad_fraction": len(failed) / max(rows, 1), "report": f"{out}/{bad_name}" if failed else None,
              "bytes": sum(s["bytes"] for s in sides), "seconds": round(seconds, 2)}
    print(f"write part {i}/{n}: {len(sides)} shards ({written} written, {counts['kept']} kept from an earlier "
          f"run), {counts['samples']} songs, {counts['bytes'] / 1e6:.1f} MB, {len(failed)} failed"
          + (f" (see {counts['report']})" if failed else "") + f"; {seconds:.1f} s")
    if n == 1 or len(fs.glob(f"{root}/index-part-*-of-{n:05d}.json")) == n:
        merge(out, fs=(fs, root))  # the last part to finish merges (twice at once is harmless: atomic puts)
    if counts["bad_fraction"] > max_bad:
        raise TooManyBadFiles(f"{counts['report']}: {len(failed)} of {rows} songs ({counts['bad_fraction']:.1%}) "
                              f"failed to decode, more than --max_bad {max_bad:.1%}; that file lists each one and "
                              f"why. The other songs are in the shards; to retry, fix the files, delete the "
                              f"sidecars (shard-*.json) of the shards that file names and prepare again")
    return counts


def merge(out, storage_options=None, fs=None):
    """Join the part indexes of `out` into index.json; refuses missing parts and overlaps."""
    fs, root = fs or _fs(out, storage_options, write=True)
    paths = sorted(fs.glob(f"{root}/index-part-*-of-*.json"))
    if not paths:
        raise ShardError(f"{out}: no part indexes (index-part-*.json); run: python data.py prepare --shards {out} ...")
    found = {tuple(int(v) for v in re.findall(r"(\d+)-of-(\d+)", p)[-1]): p for p in paths}
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        raise ShardError(f"{out}: part indexes of runs with different part counts {counts}; delete the stale ones")
    n = counts[0]
    missing = [f"{i}/{n}" for i in range(n) if (i, n) not in found]
    if missing:
        raise ShardError(f"{out}: parts {', '.join(missing)} not written yet; run: python data.py prepare "
                         f"--catalog C --shards {out} --shard {missing[0]} (for each), then merge")
    parts = [_get_json(fs, found[(i, n)]) for i in range(n)]
    layout = {k: v for k, v in parts[0].items() if k not in ("part", "shards")}
    shards, owner = {}, {}
    for p in parts:
        if {k: v for k, v in p.items() if k not in ("part", "shards")} != layout:
            raise ShardError(f"{found[tuple(p['part'])]}: another layout than part 0/{n} (catalog, "
                             f"--shard_size_mb, seed or mel settings differ); rewrite that part")
        for s in p["shards"]:
            if s["shard"] in owner:
                raise ShardError(f"{out}: shard {s['shard']} is in parts {owner[s['shard']]}/{n} and "
                                 f"{p['part'][0]}/{n}; delete the stale part indexes and write again")
            owner[s["shard"]], shards[s["shard"]] = p["part"][0], s
    absent = [k for k in range(layout["num_shards"]) if k not in shards]
    if absent:
        raise ShardError(f"{out}: shards {absent[:5]} are in no part index; write their parts again")
    entries = [shards[k] for k in range(layout["num_shards"])]
    index = {**layout, "parts": n, "samples": sum(s["samples"] for s in entries),
             "failed": sum(s["failed"] for s in entries), "bytes": sum(s["bytes"] for s in entries),
             "shards": entries}
    _put_json(fs, root, "index.json", index)
    return index


def open_index(url, storage_options=None):
    """-> (fs, root, index) of merged shards, with their mel settings checked against this code's."""
    fs, root = _fs(url, storage_options)
    path = f"{root}/index.json"
    index = _get_json(fs, path, f"{url}: no index.json; write the shards (python data.py prepare --shards "
                                f"{url}) and, with --shard i/n, merge them (python shards.py merge --out {url})")
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: not an index of {FORMAT} version {FORMAT_VERSION} "
                         f"(format {index.get('format')!r}, version {index.get('format_version')!r})")
    if index["mel_hash"] != mel_hash():
        raise ShardError(f"{path}: written with mel settings {index['mel_hash']} {index['mel_settings']}, but this "
                         f"code computes {mel_hash()} {mel_settings()}; rewrite the shards")
    return fs, root, index


def info(url, storage_options=None):
    _, _, ix = open_index(url, storage_options)
    line = (f"{url}: {len(ix['shards'])} shards, {ix['samples']} songs, {ix['failed']} failed to decode, "
            f"{ix['bytes'] / 1e6:.1f} MB, {ix['parts']} part(s); catalog {ix['catalog_rows']} rows "
            f"({ix['catalog_fingerprint'][:12]}), {ix['rows_per_shard']} rows/shard, seed {ix['seed']}; "
            f"mel settings {ix['mel_hash']} {ix['mel_settings']}")
    print(line)
    return ix


# -----------------------------------------------------------------------------
# Reading: the streaming dataset

def _tar_samples(fs, path, skip, keep=None):
    """Raw samples (json bytes, npy bytes) of one shard in order, the first `skip` not kept.
    keep: a boolean mask over catalog rows; samples of other rows are passed over unread and
    uncounted (the key is the row, so no payload is read to decide)."""
    key, cur, seen, wanted = None, {}, 0, False
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                k, ext = m.name.split(".", 1)  # WebDataset: the key is the name up to its first dot
                if k != key:
                    if cur:
                        yield cur
                    key, cur = k, {}
                    wanted = keep is None or bool(keep[int(k)])
                    seen += wanted
                if wanted and seen > skip and m.isfile():
                    cur[ext] = tar.extractfile(m).read()
            if cur:
                yield cur
    except (OSError, tarfile.TarError) as e:
        raise ShardError(f"{path}: cannot read shard ({type(e).__name__}: {e})".replace("\n", " ")) from None


def _decode(raw, path):
    meta = json.loads(raw["json"])
    if meta.get("mel_hash") != mel_hash():
        raise ShardError(f"{path}: sample {meta.get('row')} has mel settings {meta.get('mel_hash')}, this code "
                         f"{mel_hash()}; rewrite the shards")
    mel = np.load(io.BytesIO(raw["mel.npy"]), allow_pickle=False)
    if mel.shape != (meta["frames"], data.N_MELS):
        raise ShardError(f"{path}: sample {meta['row']}: mel of shape {mel.shape}, expected ({meta['frames']}, "
                         f"{data.N_MELS}); the shard is damaged, write it again")
    return {"mel": torch.from_numpy(mel.astype(np.float32)), "text": meta["text"], "row": meta["row"]}


def select_rows(url, index, catalog=None, rows=None):
    """-> (keep, samples per shard): keep None (every sample) or a boolean mask over the catalog's
    rows (`rows` of `catalog`, e.g. the train split). The shards' rows are known without reading
    them: the layout's seeded permutation cut into rows_per_shard, less each shard's failed rows."""
    counts = np.array([s["samples"] for s in index["shards"]], dtype=np.int64)
    if rows is None:
        return None, counts
    if catalog is None or catalog.fingerprint() != index["catalog_fingerprint"]:
        raise ShardError(f"{url}: written from another catalog ({index['catalog_rows']} rows, fingerprint "
                         f"{index['catalog_fingerprint'][:12]}) than "
                         f"{getattr(catalog, 'path', None)} (song_id/audio differ); write the shards of this one")
    if any(s["failed"] and s.get("failed_rows") is None for s in index["shards"]):
        raise ShardError(f"{url}: index.json names no failed rows (written by an older shards.py); write it again")
    keep = np.zeros(index["catalog_rows"], dtype=bool)
    keep[np.asarray(list(rows), dtype=np.int64)] = True
    present = keep.copy()
    present[[r for s in index["shards"] for r in (s.get("failed_rows") or [])]] = False
    order = np.random.default_rng(index["seed"]).permutation(index["catalog_rows"])
    R = index["rows_per_shard"]
    return keep, np.add.reduceat(present[order].astype(np.int64), np.arange(0, len(order), R))


class ShardDataset(IterableDataset):
    """Stage-1 songs from shards -> {"mel": (T, 128) float32, "text": X_t, "row"}, as
    data.SongDataset's items (data.Collator batches them). See the module docstring for the plan.

    batch_size: the DataLoader's (per process); rank / world_size: this process among the training
    processes (accelerator.process_index / num_processes); num_workers: the DataLoader's (it is
    checked). Iterate it with DataLoader(ds, batch_size, num_workers=num_workers), not through
    accelerator.prepare (which would re-shard or dispatch it), and persistent_workers=False, so each
    epoch's workers see set_epoch. len(ds) is samples per rank, so len(loader) is batches per rank.
    catalog + rows: only those rows of the catalog the shards were written from (pretrain.py: the
    train split), counted per shard without reading (select_rows); the others are passed over.
    """

    def __init__(self, url, batch_size, rank=0, world_size=1, num_workers=0, seed=3407, shuffle_buffer=1000,
                 storage_options=None, catalog=None, rows=None):
        if not 0 <= rank < world_size or batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ShardError(f"need 0 <= rank < world_size, batch_size >= 1, num_workers >= 0, shuffle_buffer "
                             f">= 1; got rank {rank}, world_size {world_size}, batch_size {batch_size}, "
                             f"num_workers {num_workers}, shuffle_buffer {shuffle_buffer}")
        _, _, index = open_index(url, storage_options)
        self.url, self.storage_options = url, storage_options
        self.names = [s["name"] for s in index["shards"]]
        self.keep, self.counts = select_rows(url, index, catalog, rows)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.workers, self.num_workers, self.window = max(num_workers, 1), num_workers, shuffle_buffer
        self.streams = world_size * self.workers
        total = int(self.counts.sum())
        self.stream_batches = total // (self.streams * batch_size)
        if self.stream_batches == 0:
            raise ShardError(f"{url}: {total} songs are fewer than one batch of {batch_size} for each of the "
                             f"{world_size} process(es) x {self.workers} worker(s); lower batch_size or num_workers")
        self.dropped = total - self.streams * self.stream_batches * batch_size  # per epoch, all ranks
        self.index_hash = _hash(index["shards"]) + _hash({k: v for k, v in index.items() if k != "shards"})
        if self.keep is not None:
            self.index_hash += hashlib.sha1(np.packbits(self.keep).tobytes()).hexdigest()[:16]
        self.epoch, self.start_batch = 0, 0

    def __len__(self):
        return self.workers * self.stream_batches * self.batch_size

    def set_epoch(self, epoch, start_batch=0):
        """The next iteration is epoch `epoch`, starting after `start_batch` batches of this rank."""
        if not 0 <= start_batch <= len(self) // self.batch_size:
            raise ShardError(f"start_batch {start_batch} is outside the epoch's {len(self) // self.batch_size} batches")
        self.epoch, self.start_batch = epoch, start_batch

    def plan(self):
        """What must match for an exact resume; store it in the checkpoint next to epoch and batches."""
        return {"index": self.index_hash, "world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle_buffer": self.window}

    def check_plan(self, saved):
        diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in self.plan().items() if saved.get(k) != v]
        if diff:
            raise ShardError(f"cannot resume exactly: the checkpoint's data plan differs ({'; '.join(diff)}); "
                             f"resume with the same shards and settings, or start the epoch afresh")

    def _raw_stream(self, fs, root, shard_order, start, stop):
        """Raw samples at positions [start, stop) of the epoch's shards laid end to end."""
        counts = self.counts[shard_order]
        ends = np.cumsum(counts)
        j = int(np.searchsorted(ends, start, side="right"))  # whole shards before it are skipped
        pos = start
        while pos < stop:
            path, begin = f"{root}/{self.names[shard_order[j]]}", int(ends[j] - counts[j])
            for raw in _tar_samples(fs, path, pos - begin, self.keep):
                yield raw, path
                pos += 1
                if pos >= stop:
                    return
            if pos < int(ends[j]):
                raise ShardError(f"{path}: holds fewer samples than index.json says ({counts[j]}); the shard "
                                 f"or the index was replaced, write and merge again")
            j += 1

    def __iter__(self):
        wi = get_worker_info()
        w, W = (0, 1) if wi is None else (wi.id, wi.num_workers)
        if W != self.workers:
            raise ShardError(f"ShardDataset was built for num_workers={self.num_workers} but the DataLoader "
                             f"has {W if wi else 0}; pass the same number to both")
        fs, root = _fs(self.url, self.storage_options)  # per worker: no client crosses a fork
        # a resumed DataLoader starts its round robin at worker 0, which must continue the stream
        # that would have given batch start_batch: the workers' streams rotate by start_batch
        s = (w + self.start_batch) % W
        g, B, K = self.rank * W + s, self.batch_size, self.window
        L = self.stream_batches * B
        skip = max(0, -(-(self.start_batch - s) // W)) * B  # batches stream s gave before: ceil((c-s)/W)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.names))
        first = skip // K * K
        raw = self._raw_stream(fs, root, order, g * L + first, g * L + L)
        for start in range(first, L, K):
            items = [next(raw) for _ in range(min(K, L - start))]
            perm = np.random.default_rng([self.seed, self.epoch, g, start // K]).permutation(len(items))
            for t in range(max(skip - start, 0), len(items)):
                yield _decode(*items[perm[t]])


class ShardSongs(IterableDataset):
    """Every song of this rank's shards, once, in no particular order (items as ShardDataset's): for
    embedding a catalog under `accelerate launch` (evaluate.py embed --shards). Rank r of n reads
    shards r, r + n, r + 2n, ...; DataLoader worker w of W every W-th of those. Each item carries its
    catalog row, so the outputs of all ranks are put back into catalog order when merged."""

    def __init__(self, url, rank=0, world_size=1, storage_options=None, catalog=None, rows=None):
        _, _, index = open_index(url, storage_options)
        self.url, self.storage_options, self.names = url, storage_options, [s["name"] for s in index["shards"]]
        self.keep, counts = select_rows(url, index, catalog, rows)
        self.mine = list(range(rank, len(self.names), world_size))
        self.samples = int(counts[self.mine].sum())

    def __len__(self):
        return self.samples

    def __iter__(self):
        wi = get_worker_info()
        w, W = (0, 1) if wi is None else (wi.id, wi.num_workers)
        fs, root = _fs(self.url, self.storage_options)
        for k in self.mine[w::W]:
            path = f"{root}/{self.names[k]}"
            for raw in _tar_samples(fs, path, 0, self.keep):
                yield _decode(raw, path)


# -----------------------------------------------------------------------------
# Loader benchmark (bench.py calls loader_benchmark)

def loader_benchmark(url, batch_size=100, num_workers=4, batches=50, storage_options=None, cold=False,
                     shuffle_buffer=1000, collate=None):
    """Stream `batches` batches (epochs repeat as needed) through collate (default data.Collator(None),
    no tokenization) -> rates. cold=True (local folders): the shards' pages are evicted from the
    page cache first."""
    if cold:
        fs, root = _fs(url, storage_options)
        if not _is_local(fs):
            raise ShardError(f"{url}: cold=True evicts the page cache of a local folder only")
        drop_page_cache(root)
    ds = ShardDataset(url, batch_size, num_workers=num_workers, storage_options=storage_options,
                      shuffle_buffer=shuffle_buffer)
    loader = DataLoader(ds, batch_size, num_workers=num_workers, collate_fn=collate or data.Collator(None))
    samples = frames = got = 0
    cpu0 = _cpu_seconds()
    waits, t0 = [], time.perf_counter()  # per epoch: workers start and fill a window before batch 1
    for epoch in range(batches):
        ds.set_epoch(epoch)
        te = time.perf_counter()
        for k, batch in enumerate(loader):
            waits += [time.perf_counter() - te] if k == 0 else []
            samples += len(batch["row"])
            frames += int((~batch["padding_mask"]).sum())
            got += 1
            if got == batches:
                break
        if got == batches:
            break
    dt = time.perf_counter() - t0
    del batch
    gc.collect()  # the last epoch's workers are joined: their CPU time is counted (RUSAGE_CHILDREN)
    cpu = _cpu_seconds() - cpu0
    mb = frames * data.N_MELS * 2 / 1e6  # fp16 bytes as stored
    steady = dt - sum(waits)  # without the epoch starts, which a real epoch (~10^5 batches) amortizes
    return {"url": str(url), "batches": got, "samples": samples, "seconds": round(dt, 3), "epochs": len(waits),
            "first_batch_s": round(waits[0], 3), "samples_per_s": round(samples / dt, 1),
            "mb_per_s": round(mb / dt, 1), "steady_samples_per_s": round(samples * (1 - len(waits) / got) / steady, 1),
            "cpu_seconds": round(cpu, 2), "samples_per_cpu_s": round(samples / max(cpu, 1e-9), 1)}


def _cpu_seconds():
    """CPU time of this process and of its children that have ended (DataLoader workers, once joined):
    samples per CPU second is the loader's cost per core, which other processes on the cores do not change."""
    import resource
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


GPU_SAMPLES_PER_S = 641  # one H200 in the paper's stage-1 step (bf16, batch 100), measured (docs/PERFORMANCE.md)


def paper_size_mel(path):
    """A full 120 s song's log-mel shape (1251 x 128) of seeded noise: the loader report's song_mel."""
    rng = np.random.default_rng(int(hashlib.sha1(path.encode()).hexdigest()[:8], 16))
    return rng.standard_normal((data.MAX_FRAMES, data.N_MELS), dtype=np.float32)


def _disk_read_mb():
    """MB the kernel has read from block devices since boot (/proc/vmstat pgpgin, KiB), or None."""
    try:
        with open("/proc/vmstat") as f:
            return next(int(v) for k, v in (line.split() for line in f) if k == "pgpgin") / 1024 * 1.048576
    except (OSError, StopIteration, ValueError):
        return None


def _report_row(key, what, r, notes):
    return {"name": "loader/shards", "config": what, "rate": r["samples_per_s"], "unit": "samples/s", "key": key,
            "mb_per_s": r["mb_per_s"], "vs_gpu": round(r["samples_per_s"] / GPU_SAMPLES_PER_S, 2),
            "per_core": r["samples_per_cpu_s"],
            "notes": f"{r['mb_per_s']} MB/s, {r['samples_per_s'] / GPU_SAMPLES_PER_S:.2f}x one H200 "
                     f"({GPU_SAMPLES_PER_S}/s; goal 1.5x); {r['samples_per_cpu_s']} per CPU second (all its "
                     f"processes); steady {r['steady_samples_per_s']}/s; first batch {r['first_batch_s']} s; {notes}"}


def loader_report(catalog_path, folder, tokenizer=None, batch_size=100, worker_counts=(1, 2), shard_bytes=32 * 10 ** 6):
    """bench.py's loader/shards rows: one epoch of paper-size samples (1251 frames, fp16) streamed from
    local shards with a cold page cache (POSIX_FADV_DONTNEED after fsync; the kernel's own count of
    disk reads says whether it was), warm, and from a local S3 server (moto, if installed), each
    against one H200's consumption. Texts are tokenized as in training (data.Collator(tokenizer))."""
    local = os.path.join(folder, "local")
    with contextlib.redirect_stdout(io.StringIO()):
        write(catalog_path, local, shard_bytes=shard_bytes, num_workers=2, mel_fn=paper_size_mel)
    collate, rows = data.Collator(tokenizer, 512), []
    total = open_index(local)[2]["samples"]
    for w in worker_counts:
        epoch = total // (max(w, 1) * batch_size)  # batches of one epoch: all of it is read once
        for cold in (True, False):
            before = _disk_read_mb()
            r = loader_benchmark(local, batch_size, w, epoch * max(w, 1), cold=cold, collate=collate)
            disk = None if before is None else round(_disk_read_mb() - before)
            rows.append(_report_row(f"loader_shards_{'cold' if cold else 'warm'}_w{w}",
                                    f"local shards, {'cold' if cold else 'warm'} page cache, workers {w}", r,
                                    f"{total} songs; {disk} MB read from disk meanwhile"))
    w = max(worker_counts)  # where the time goes: the same, warm, without tokenizing the 512-token texts
    r = loader_benchmark(local, batch_size, w, total // (max(w, 1) * batch_size) * max(w, 1))
    rows.append(_report_row(f"loader_shards_notext_w{w}", f"local shards, warm, workers {w}, texts not tokenized",
                            r, "the ceiling if shards held token ids"))
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        return rows
    rows.append(_s3_row(ThreadedMotoServer, catalog_path, shard_bytes, batch_size, max(worker_counts), collate, total))
    return rows


def _s3_row(server_cls, catalog_path, shard_bytes, batch_size, w, collate, total):
    import logging
    import socket
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # else a line per request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, url = server_cls(ip_address="127.0.0.1", port=port, verbose=False), f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    server.start()
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=url)
        fs, _ = _fs("s3://bench")
        fs.mkdir("bench")
        with contextlib.redirect_stdout(io.StringIO()):
            write(catalog_path, "s3://bench/mels", shard_bytes=shard_bytes, num_workers=2, mel_fn=paper_size_mel)
        r = loader_benchmark("s3://bench/mels", batch_size, w, total // (w * batch_size) * w, collate=collate)
    finally:
        server.stop()
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        for k in (k for k, v in saved.items() if v is None):
            os.environ.pop(k, None)
    return _report_row(f"loader_shards_s3_w{w}", f"local S3 server (moto, in this process), workers {w}", r,
                       f"{total} songs over HTTP from objects in the server's memory")


# -----------------------------------------------------------------------------
# Command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # bad input: one line, like every other error here
        self.exit(2, f"Error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(description="HTCL log-mel shards: merge, inspect, benchmark (written by data.py prepare --shards).",
                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    q = sub.add_parser("merge", formatter_class=fmt, allow_abbrev=False, help="join part indexes into index.json")
    q.add_argument("--out", required=True, help="folder or URL the parts were written to")
    q = sub.add_parser("info", formatter_class=fmt, allow_abbrev=False, help="summarize a shard index")
    q.add_argument("url", help="folder or URL holding index.json")
    q = sub.add_parser("bench", formatter_class=fmt, allow_abbrev=False, help="loader throughput")
    q.add_argument("url", help="folder or URL holding index.json")
    q.add_argument("--batch_size", type=int, default=100)
    q.add_argument("--num_workers", type=int, default=4)
    q.add_argument("--batches", type=int, default=50)
    q.add_argument("--cold", action="store_true", help="evict the local shards from the page cache first")
    args = p.parse_args(argv)
    if args.command == "merge":
        ix = merge(args.out)
        print(f"merge: {len(ix['shards'])} shards, {ix['samples']} songs from {ix['parts']} parts -> {args.out}/index.json")
    elif args.command == "info":
        info(args.url)
    else:
        print(json.dumps(loader_benchmark(args.url, args.batch_size, args.num_workers, args.batches, cold=args.cold)))


if __name__ == "__main__":
    try:
        main()
    except (data.CatalogError, OSError) as e:  # a data problem: the message says where; a traceback adds nothing
        sys.exit(f"Error: {e}".replace("\n", " "))
    except Exception as e:  # the storage client's own errors (botocore's missing credentials, ...)
        if not type(e).__module__.startswith(("botocore", "aiobotocore", "google", "aiohttp")):
            raise
        sys.exit(f"Error: {type(e).__name__}: {e}".replace("\n", " "))
