"""Song embeddings of a paper-scale catalog from log-mel shards, one process per GPU.

HTCL Sec. 3.1.3 evaluates frozen song embeddings; at 10M+ songs their log-mels live in tar shards
(shards.py, written by `data.py prepare --shards`), not in one disk's memory-mapped cache:

    accelerate launch --num_processes 8 evaluate.py embed --artifact A --catalog C --shards s3://b/mels --out emb/
    python evaluate.py embed --artifact A --catalog C --shards DIR --out emb/       # one process: the same files

Rank r of n embeds the wanted songs of its own shards (r, r + n, r + 2n, ...: shards.ShardSongs),
with the loop embed_catalog runs (evals.embeddings.embed_batches), and writes them with their
catalog rows to OUT/.parts/part-r-of-n.npz; rank 0 waits for every part of this job, merges them
into the order of the wanted rows (merge_parts) and hands them to cmd_embed, which writes the usual
`embed` folder (ids.txt + KIND.npy + meta.json). So 2 processes give the files of 1, in the same
order, with values equal within float tolerance (a song's batch neighbours differ; padding is
masked). A part already written for the same job (artifact, shards, rows, mode, kinds) is kept,
so a rerun after a crash embeds only the ranks that had not finished. OUT must be one folder all
ranks see (a shared filesystem on several machines).
"""
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

import shards
from data import Collator
from evals.embeddings import DEVICE, artifact_digest, embed_batches, embed_catalog

PART_WAIT_SECONDS = 5.0  # rank 0 polls for the other ranks' parts (no collective: no barrier timeout)


def _state():
    from accelerate import PartialState
    # several CPU processes (tests, a CPU box): gloo, which Accelerate uses only when told cpu=True
    return PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def device(url=None):
    """With shards: this process's device under `accelerate launch` (its own GPU); else evals.embeddings.DEVICE."""
    return _state().device if url else DEVICE


def embed_songs(args, model, tokenizer, catalog, rows, mode, kinds, cache):
    """evaluate.py embed's embeddings -> {kind: (len(rows), D)}: in this process from --cache or the
    audio (embed_catalog), or with --shards over every rank (embed; None on all ranks but 0)."""
    if not args.shards:
        return embed_catalog(model, tokenizer, catalog, rows, mode, kinds, cache, args.batch_size)
    return embed(args.shards, model, tokenizer, catalog, rows, mode, kinds, args.batch_size, args.out, args.artifact)


def job_key(artifact, url, rows, mode, kinds):
    """What a part was embedded from: a part of another job is never merged."""
    h = hashlib.sha1(json.dumps([artifact_digest(artifact), str(url), mode, list(kinds)]).encode())  # as provenance
    h.update(np.asarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def _part_path(out, rank, world):
    return os.path.join(out, ".parts", f"part-{rank:05d}-of-{world:05d}.npz")


def _read_part(path, job):
    """The part at path if it belongs to this job, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files} if str(z["job"]) == job else None
    except (OSError, ValueError, KeyError):  # absent, or a foreign file
        return None


def _write_part(path, part):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[:-len(".npz")] + f".tmp-{os.getpid()}.npz"
    np.savez(tmp, **part)
    os.replace(tmp, path)  # rank 0 never sees half a part


def embed(url, model, tokenizer, catalog, rows, mode, kinds, batch_size, out, artifact, num_workers=2):
    """This rank's part; on rank 0 then every rank's, merged -> {kind: (len(rows), D)}; None elsewhere."""
    state = _state()
    rank, world = state.process_index, state.num_processes
    job, path = job_key(artifact, url, rows, mode, kinds), _part_path(out, rank, world)
    if _read_part(path, job) is None:
        ds = shards.ShardSongs(url, rank, world, catalog=catalog, rows=rows)
        got = []  # the catalog rows, in the order the batches come

        def batches():
            loader = DataLoader(ds, batch_size, num_workers=min(num_workers, len(ds.mine)),
                                collate_fn=Collator(tokenizer))  # as embed_catalog's
            for b in loader:
                got.append(b["row"].numpy())
                yield b
        embs = embed_batches(model, batches(), len(ds), mode, kinds, batch_size) if len(ds) else {}
        _write_part(path, {"job": np.array(job), "rows": np.concatenate(got) if got else np.zeros(0, np.int64),
                           **embs})
    if not state.is_main_process:
        return None
    embs = merge_parts(out, world, job, catalog, rows)
    shutil.rmtree(os.path.join(out, ".parts"), ignore_errors=True)
    return embs


def merge_parts(out, world, job, catalog, rows, timeout=None):
    """Every rank's part of `job` in OUT/.parts -> {kind: (len(rows), D) float32} in the order of
    `rows`; each wanted row must come exactly once (a song that failed to decode when the shards
    were written has no embedding: an error naming it). Waits for parts not written yet."""
    where = np.full(len(catalog), -1, dtype=np.int64)
    where[np.asarray(rows, dtype=np.int64)] = np.arange(len(rows))
    seen, merged, t0 = np.zeros(len(rows), dtype=np.int64), {}, time.time()
    for r in range(world):
        path = _part_path(out, r, world)
        while (part := _read_part(path, job)) is None:
            if timeout is not None and time.time() - t0 > timeout:
                raise shards.ShardError(f"{path}: no part of this job after {timeout:.0f} s; is rank {r} running?")
            time.sleep(PART_WAIT_SECONDS)
        pos = where[part["rows"]]
        if (pos < 0).any():
            raise shards.ShardError(f"{path}: holds catalog rows that were not asked for, e.g. "
                                    f"{int(part['rows'][np.argmax(pos < 0)])}; delete {out}/.parts and embed again")
        np.add.at(seen, pos, 1)
        for kind in (k for k in part if k not in ("job", "rows")):
            merged.setdefault(kind, np.zeros((len(rows), part[kind].shape[1]), dtype=np.float32))[pos] = part[kind]
    if (seen != 1).any():
        lost = [catalog[rows[i]].song_id for i in np.flatnonzero(seen != 1)[:5]]
        raise shards.ShardError(f"{catalog.path}: {int((seen == 0).sum())} songs have no log-mel in the shards "
                                f"(failed to decode when written) and {int((seen > 1).sum())} came twice, "
                                f"e.g. {lost}; fix or remove them from the catalog")
    return merged
