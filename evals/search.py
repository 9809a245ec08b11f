"""Similar-song search: "which songs of my catalog sound like this file?"

A query is an audio file (embedded here: no catalog row, no text) or a song id of the catalog.
Songs are compared by their audio embeddings, the only kind a bare file has. Exact cosine top-k
in torch (evals.metrics.cosine_topk) by default; for large catalogs a FAISS index (faiss-cpu, an
optional extra imported only when asked for) that `embed --index faiss` saves beside the
embeddings, and that `matching --index faiss` can use too. Not a protocol of the papers: the
use a trained model is put to.

Commands (from the repo root; A = a trained artifact folder):
  python evaluate.py embed --artifact A --catalog sample_data/catalog.csv --out emb/htcl [--index faiss]
  python evaluate.py search --model A --catalog sample_data/catalog.csv --emb emb/htcl \
      --query my_song.wav --query s0001 --k 10 [--index faiss] [--out similar.csv]

Similar songs from Python (the search sub-command does this):
  from data import load_catalog
  from evals.embeddings import load_embeddings
  from evals.search import embed_audio_files, search
  from model import load_artifact
  model, tokenizer = load_artifact("runs/demo/finetune/final")
  ids, keys = load_embeddings("emb/htcl")            # or embed_catalog(model, tokenizer, catalog)["audio"]
  query = embed_audio_files(model, ["my_song.wav"])  # (1, D), normalized
  scores, rows = search(query, keys, k=10)           # index=build_index(keys): FAISS (pip install faiss-cpu)
  catalog = load_catalog("sample_data/catalog.csv")
  for score, row in zip(scores[0], rows[0]):
      song = catalog[catalog.index[ids[row]]]
      print(f"{score:.3f}  {song.song_id}  {song.title} - {song.artists}")
"""
import csv
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from data import Collator, seconds_to_frames, song_mel
from evals.embeddings import (DEVICE, _encode_audio, add_command, check_provenance, embed_catalog,
                              embedding_provenance, is_artifact, load_embeddings, load_inputs, positive_int,
                              read_ids, read_json, read_provenance, row_name, song_embeddings_provenance,
                              write_json)
from evals.metrics import as_float_tensor, cosine_topk, markdown_table
from model import load_artifact

# Below this many songs the index is exact (IndexFlatIP); from it on, approximate:
# IVF (inverted lists of k-means cells, sqrt(N) cells) scanning FAISS_NPROBE cells a
# query, with exact cosines for the songs scanned. Chosen by measuring
# (docs/PERFORMANCE.md): of the candidates tried on 2 busy cores it was the one that built in
# minutes (IVF-PQ did not), and unlike PQ it returns true cosine scores; it keeps
# all vectors (400 MB at 1M x 100-d).
FAISS_APPROX_FROM = 1_000_000
FAISS_NPROBE = 64


def require_faiss():
    """The faiss module, or an error that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise ModuleNotFoundError("--index faiss needs the optional package faiss-cpu: pip install faiss-cpu "
                                  "(or leave out --index for exact search in torch)") from None
    return faiss


def _unit_rows(x):
    """(N, D) -> L2-normalized float32 C-contiguous numpy, the layout FAISS wants."""
    return np.ascontiguousarray(F.normalize(as_float_tensor(x), dim=-1).cpu().numpy(), dtype=np.float32)


def build_index(emb, approx_from=FAISS_APPROX_FROM, nprobe=FAISS_NPROBE, seed=0):
    """A FAISS inner-product index over the normalized rows of emb (N, D): cosine search.
    Exact below approx_from songs, IVF-Flat with ~sqrt(N) cells from it on."""
    faiss = require_faiss()
    x = _unit_rows(emb)
    n, d = x.shape
    if n < approx_from:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = 2 ** round(math.log2(math.sqrt(n)))  # 1,024 cells at 1M songs
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        # 40 songs a cell train k-means as well as all of them would (FAISS warns below 39)
        sample = np.random.default_rng(seed).choice(n, min(n, 40 * nlist), replace=False)
        index.train(x[np.sort(sample)])
        faiss.extract_index_ivf(index).nprobe = nprobe
    index.add(x)
    return index


def index_path(spec, kind="audio"):
    """Where `embed --index faiss` saves the index of an embeddings spec: FOLDER/{kind}.faiss or NAME.faiss."""
    return os.path.join(spec, f"{kind}.faiss") if os.path.isdir(spec) else spec[:-len(".npy")] + ".faiss"


def _sha256(x):
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


def save_or_drop_index(folder, kind, x, provenance=None):
    """With provenance: FOLDER/KIND.faiss and its record KIND.faiss.json (the embeddings' provenance,
    the kind, and the sha256 of the vectors it holds). Without: a stale index of before is removed."""
    path = index_path(folder, kind)
    if provenance is None:
        for p in (path, path + ".json"):
            if os.path.exists(p):
                os.remove(p)
        return
    require_faiss().write_index(build_index(x), path)
    write_json(path + ".json", {**provenance, "kind": kind, "embeddings_sha256": _sha256(x)})
    print(f"embed: FAISS index of {kind} -> {path}")


def load_index(path, n, dim, nprobe=FAISS_NPROBE, emb=None, provenance=None, kind="audio"):
    """A saved index, checked against the embeddings it claims to hold (n rows of dim) and, where
    its KIND.faiss.json says, against their bytes (emb) and their provenance."""
    faiss = require_faiss()
    index = faiss.read_index(path)
    if (index.ntotal, index.d) != (n, dim):
        raise ValueError(f"{path}: the index holds {index.ntotal} x {index.d} vectors but its embeddings are "
                         f"{n} x {dim}; rebuild it with `embed --index faiss`")
    record = read_json(path + ".json", "an index provenance record") if os.path.exists(path + ".json") else None
    if record is None:
        print(f"warning: {path} has no {os.path.basename(path)}.json: it cannot be checked against its embeddings; "
              f"rebuild it with `embed --index faiss`", file=sys.stderr)
    else:
        if emb is not None and record.get("embeddings_sha256") not in (None, _sha256(emb)):
            raise ValueError(f"{path} indexes other vectors than {os.path.dirname(path) or '.'}/{kind}.npy holds "
                             f"(sha256 differs): rebuild it with `embed --index faiss`")
        check_provenance(record, {**(provenance or {}), "kind": kind}, path, "its embeddings")
    if hasattr(faiss, "try_extract_index_ivf") and faiss.try_extract_index_ivf(index) is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe
    return index


def catalog_index(spec, catalog, emb, nprobe=FAISS_NPROBE):
    """The saved FAISS index of an --emb when its rows are the catalog's, in order; else one built here
    (`matching --index faiss`)."""
    saved = index_path(spec) if not is_artifact(spec) and (os.path.isdir(spec) or spec.endswith(".npy")) else None
    if saved and os.path.exists(saved):
        ids = read_ids(os.path.join(spec, "ids.txt") if os.path.isdir(spec) else spec[:-len(".npy")] + ".ids.txt")
        if ids == [s.song_id for s in catalog.songs]:
            return load_index(saved, *emb.shape, nprobe=nprobe, emb=emb, provenance=read_provenance(spec))
        print(f"matching: {saved} indexes other songs or another order than {catalog.path}; building one here")
    return build_index(emb, nprobe=nprobe)


def neighbours(queries, keys, k, index=None, batch_size=1024, progress=None):
    """Top-k keys by cosine for each query -> (scores (Q, k), rows (Q, k)) torch tensors, best first.
    index None: exact, cosine_topk in torch. A FAISS index over keys: its search; a row -1 (score
    -inf) is a slot an approximate index left empty."""
    if index is None:
        return cosine_topk(queries, keys, k, batch_size=batch_size, progress=progress)
    q = _unit_rows(queries)
    k = min(k, index.ntotal)
    scores, rows = [], []
    for start in range(0, len(q), batch_size):
        s, r = index.search(q[start:start + batch_size], k)
        scores.append(np.where(r >= 0, s, -np.inf))
        rows.append(r)
        if progress is not None:
            progress.update(len(r))
    return (torch.from_numpy(np.concatenate(scores)).float().reshape(-1, k),
            torch.from_numpy(np.concatenate(rows)).long().reshape(-1, k))


def search(query_emb, key_emb, k=10, exclude=None, index=None):
    """The k songs most cosine-similar to each query -> (scores (Q, k) float32, rows (Q, k) int64) numpy.

    query_emb (Q, D) and key_emb (N, D): arrays or tensors, normalized here. exclude: (Q,) key
    row that query q may not retrieve (the song itself, for a song-id query), -1 for none.
    index: a FAISS index over key_emb (build_index, load_index), None for exact search.
    Rows -1 with score -inf fill slots left empty (k > N, or an approximate index's miss).
    """
    scores, rows = neighbours(query_emb, key_emb, k + 1, index)  # one spare for the excluded song
    scores, rows = scores.numpy(), rows.numpy()
    width = min(k, rows.shape[1])
    if exclude is not None:
        drop = rows == np.asarray(exclude)[:, None]
        order = np.argsort(drop, axis=1, kind="stable")  # the excluded song, if listed, moves last
        rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
        drop = np.take_along_axis(drop, order, 1)
        rows, scores = np.where(drop, -1, rows), np.where(drop, -np.inf, scores)
    return scores[:, :width].astype(np.float32), rows[:, :width].astype(np.int64)


@torch.no_grad()
def embed_audio_files(model, paths, mode=None, batch_size=16, chunk_seconds=None):
    """Audio files, no catalog row or text needed -> (len(paths), D) float32 normalized audio
    embeddings: the computation embed_catalog does (eval mode, first 120 s, padded batches with a
    mask, the same mode and window), so a catalog song's own file gets its catalog embedding back.
    mode / chunk_seconds None: the artifact's own (model.cfg.embed_mode, model.cfg.chunk_seconds)."""
    model.eval()
    mode = mode or model.cfg.embed_mode
    chunk_frames = seconds_to_frames(chunk_seconds or model.cfg.chunk_seconds)
    device = next(model.parameters()).device
    collate = Collator(tokenizer=None)  # mels only: padding and masks, no tokenizer needed
    out = []
    for start in range(0, len(paths), batch_size):
        batch = collate([{"mel": song_mel(p)} for p in paths[start:start + batch_size]])
        mel, mask = batch["mel"].to(device), batch["padding_mask"].to(device)
        out.append(F.normalize(_encode_audio(model, mel, mask, mode, batch_size, chunk_frames), dim=-1))
    return torch.cat(out).float().cpu().numpy()


def parse_queries(queries, song_ids, source):
    """Each --query -> ("file", path) or ("song", song_id). `id:X` forces a song id; a string that
    is both an existing file and a song id is an error, as is one that is neither."""
    out = []
    for q in queries:
        if q.startswith("id:") and q[3:] in song_ids:
            out.append(("song", q[3:]))
            continue
        is_file, is_song = os.path.isfile(q), q in song_ids
        if is_file and is_song:
            raise ValueError(f"--query {q}: both a file and a song_id of {source}; write ./{q} for the file "
                             f"or id:{q} for the song")
        if not is_file and not is_song:
            import difflib
            close = difflib.get_close_matches(q, song_ids, n=3) if len(song_ids) <= 100_000 else []
            hint = f" (close song_ids: {', '.join(close)})" if close else ""
            raise ValueError(f"--query {q}: no such file, and no song_id '{q}' in {source}{hint}")
        out.append(("file", q) if is_file else ("song", q))
    return out


SEARCH_COLUMNS = ("query", "rank", "song_id", "score", "title", "artists")


def write_search_results(path, records):
    """records (dicts with SEARCH_COLUMNS) -> path, CSV or JSON by its extension."""
    if path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1, ensure_ascii=False)
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=SEARCH_COLUMNS)
            w.writeheader()
            w.writerows(records)


def _search_keys(args, catalog, cache, model):
    """The songs searched -> (song_ids, (N, D) embeddings, saved index path or None, provenance or None).
    The provenance says how the queries must be embedded: by the same weights, in the same mode."""
    if args.emb:
        if is_artifact(args.emb):
            raise ValueError(f"--emb {args.emb}: an artifact folder; pass it as --model, or give --emb the "
                             f"output of `embed`")
        ids, x = load_embeddings(args.emb)
        unknown = [i for i in ids if i not in catalog.index]
        if unknown:
            raise ValueError(f"{args.emb}: {len(unknown)} embedded songs are not in {catalog.path}, e.g. "
                             f"{', '.join(unknown[:5])}; was it embedded from another catalog?")
        return ids, x, index_path(args.emb), song_embeddings_provenance(args.emb)
    print(f"{args.model}: embedding {len(catalog)} songs; save them once with `embed` and pass --emb to skip this")
    x = embed_catalog(*model, catalog, cache=cache, batch_size=args.batch_size)["audio"]
    return [s.song_id for s in catalog.songs], x, None, embedding_provenance(args.model, model[0])


def _embed_file_queries(args, model, files, keys, prov):
    """The audio-file queries, embedded as the searched songs were: same weights (refused otherwise,
    naming both), same mel settings, same mode and window; and of the same width."""
    if not args.model:
        raise ValueError(f"--query {files[0]}: an audio file; embedding it needs --model ARTIFACT (the model "
                         f"that made {args.emb})")
    mode, chunk = (prov.get("embed_mode"), prov.get("chunk_seconds")) if prov else (None, None)
    mine = embedding_provenance(args.model, model[0], mode, chunk)
    if prov:
        check_provenance(prov, mine, f"--emb {args.emb}", f"--model {args.model}")
    elif args.emb:
        print(f"warning: {args.emb} records no provenance (embedded before provenance.json existed, or not by "
              f"`embed`): the queries are embedded by {args.model} in its own mode ({mine['embed_mode']}), "
              f"unchecked", file=sys.stderr)
    width = model[0].cfg.embed_dim
    if keys.shape[1] != width:
        raise ValueError(f"--emb {args.emb} holds {keys.shape[1]}-d embeddings but --model {args.model} makes "
                         f"{width}-d ones: not the model that embedded them")
    return embed_audio_files(model[0], files, mine["embed_mode"], args.batch_size, mine["chunk_seconds"])


def score_digits(scores, least=4, most=7):
    """Decimals that tell apart the printed scores: `least`, more when two distinct scores would
    round alike (a collapsed model's are all 0.9997-1.0000), up to `most` (float32 keeps ~7)."""
    v = np.unique(np.asarray(scores, dtype=np.float64))
    gap = np.diff(v).min() if len(v) > 1 else 1.0
    return int(min(most, max(least, np.ceil(-np.log10(gap) - 1e-6))))  # d decimals part scores >= 10^-d apart


def cmd_search(args):
    if not args.model and not args.emb:
        raise ValueError("search: give --model ARTIFACT (embeds catalog and queries) or --emb SAVED (from "
                         "`embed`), or both")
    if args.out and not args.out.endswith((".csv", ".json")):
        raise ValueError(f"--out {args.out}: the format follows the extension, .csv or .json")
    if args.index == "faiss":
        require_faiss()  # missing: say so now, not after embedding the catalog
    catalog, cache = load_inputs(args)
    model = load_artifact(args.model, DEVICE, text=False) if args.model else None  # (model, None): audio only
    ids, keys, saved_index, prov = _search_keys(args, catalog, cache, model)
    row_of = {i: r for r, i in enumerate(ids)}
    queries = parse_queries(args.query, row_of, args.emb or catalog.path)
    files = [q for kind, q in queries if kind == "file"]
    file_emb = iter(_embed_file_queries(args, model, files, keys, prov)) if files else None
    query_emb = np.stack([next(file_emb) if kind == "file" else keys[row_of[q]] for kind, q in queries])
    exclude = np.array([row_of[q] if kind == "song" else -1 for kind, q in queries])
    index = None
    if args.index == "faiss":
        if saved_index and os.path.exists(saved_index):
            index = load_index(saved_index, *keys.shape, nprobe=args.nprobe, emb=keys, provenance=prov)
        else:
            print(f"search: building a FAISS index of {len(ids)} songs in memory"
                  + (f" (save it with `embed --index faiss`: no {saved_index})" if saved_index else ""))
            index = build_index(keys, nprobe=args.nprobe)
    scores, rows = search(query_emb, keys, args.k, exclude, index)
    artifact = args.model or (prov or {}).get("artifact")  # the model's name: its run folder (row_name)
    print(f"search: model {row_name(artifact)} ({artifact})" if artifact else f"search: embeddings {args.emb}")
    digits = score_digits(scores[rows >= 0])
    records = []
    for (kind, q), s, r in zip(queries, scores, rows):
        table = []
        for rank, (score, row) in enumerate(((s_, r_) for s_, r_ in zip(s, r) if r_ >= 0), start=1):
            song = catalog[catalog.index[ids[row]]]
            records.append({"query": q, "rank": rank, "song_id": song.song_id, "score": round(float(score), 6),
                            "title": song.title, "artists": song.artists})
            table.append([rank, f"{score:.{digits}f}", song.song_id, song.title, song.artists])
        print(f"\nsearch: {q} ({'audio file' if kind == 'file' else 'song id, itself left out'})")
        print(markdown_table(["rank", "score", "song_id", "title", "artists"], table))
    if args.out:
        write_search_results(args.out, records)
        print(f"search: {len(records)} rows -> {args.out}")
    return records


def add_parser(subparsers):
    """The `search` sub-command."""
    q = add_command(subparsers, "search", cmd_search,
                    "similar songs: the top k of a catalog for audio files or song ids", source=False)
    q.add_argument("--catalog", required=True, help="catalog CSV/JSONL (data.py format): titles and artists, "
                   "and the songs searched when --emb is not given")
    q.add_argument("--query", action="append", required=True, metavar="FILE_OR_SONG_ID",
                   help="an audio file (no catalog row needed) or a song_id (left out of its own results; "
                        "id:X forces a song id); repeat for several")
    q.add_argument("--model", help="artifact folder (pretrain.py / finetune.py): embeds the audio-file queries, "
                   "and the catalog when --emb is not given")
    q.add_argument("--emb", help="embeddings saved by `embed` (a folder, or NAME.npy + NAME.ids.txt): the songs "
                   "searched, instead of embedding the catalog again")
    q.add_argument("--k", type=positive_int, default=10, help="results per query")
    q.add_argument("--index", default="exact", choices=["exact", "faiss"],
                   help="exact: cosine top-k in torch; faiss: the index saved by `embed --index faiss` (built in "
                        "memory if absent; pip install faiss-cpu)")
    q.add_argument("--nprobe", type=positive_int, default=FAISS_NPROBE,
                   help=f"cells an approximate FAISS index (>= {FAISS_APPROX_FROM:,} songs) scans per query")
    q.add_argument("--cache", help="log-mel cache folder (data.py prepare) for embedding the catalog")
    q.add_argument("--batch_size", type=positive_int, default=16, help="songs per forward pass when embedding")
    q.add_argument("--out", help="also write one row per (query, rank) to this .csv or .json file")
    return q

