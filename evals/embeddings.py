"""Song embeddings in and out, defined once for every protocol: where an embedding matrix comes from.

HTCL evaluates frozen song representations (Sec. 3.1.3); CrossMuSim embeds a song as the mean of
its 10 s windows. embed_catalog computes either from a trained artifact; `python evaluate.py embed
--artifact A --catalog C --out FOLDER [--text] [--fused] [--mode chunked]` writes them once.

Every sub-command takes `--emb SPEC` (repeat it to compare models), SPEC one of
  a folder from `embed`   ids.txt (one song_id a line) + audio.npy, and text.npy / fused.npy
                          when asked for; --kind picks one (default audio); provenance.json
                          says what made them (see check_provenance): a folder whose artifact
                          has been retrained since is refused
  NAME.npy                float32 (N, D) with NAME.ids.txt beside it, one song_id a line in
                          row order: how any other model (a baseline) is evaluated
  an artifact folder      pretrain.py / finetune.py output (config.json): embedded on the fly
  random[:D]              seeded Gaussian vectors, D = 100 by default: the chance baseline
  untrained:ARTIFACT, melstats   the untrained encoder and log-mel mean + std (evals/baselines.py)
Rows are matched to the catalog by song_id; a catalog song without an embedding is an error.
Also here, as the other inputs every protocol reads: the readers of the evaluation logs
(read_records, read_impressions for ranking and Figure 2, read_labelled_pairs for Figure 2), and
the pieces every sub-command's CLI shares (add_command, load_inputs, embeddings_of, row_names,
catalog_column).
"""
import hashlib
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data import (HOP_LENGTH, MAX_FRAMES, MIN_FRAMES, N_FFT, N_MELS, SAMPLE_RATE, TOP_DB, Collator, MelCache,
                  SongDataset, load_catalog, seconds_to_frames)
from data import number_type  # the one argparse check of a number's sign and size
from data import _read_records  # the CSV/JSONL reader whose errors name file, line and column
from evals.metrics import progress_bar
from model import load_artifact

KINDS = ("audio", "text", "fused")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # for the encoders; the small evaluation models stay on CPU
CHUNK_FRAMES = 10 * SAMPLE_RATE // HOP_LENGTH  # CrossMuSim's 10 s windows: 104 frames at 16 kHz, 96 ms hop


@torch.no_grad()
def embed_catalog(model, tokenizer, catalog, rows=None, mode=None, kinds=("audio",), cache=None, batch_size=16,
                  chunk_frames=None):
    """Embeddings of catalog songs -> {kind: (len(rows), D) float32 numpy}, rows in the order given.

    mode "full":    the whole decoded song (first 120 s) in one pass: HTCL's setting.
    mode "chunked": non-overlapping windows of chunk_frames (10 s), each encoded on its own,
                    then mean-pooled: CrossMuSim's inference. A trailing window shorter than
                    MIN_FRAMES is dropped, unless it is the song's only one.
    mode None:      the mode the model was trained for (model.cfg.embed_mode); chunk_frames None:
                    model.cfg.chunk_seconds (10 s unless the artifact says otherwise).
    NOTE(paper): CrossMuSim chunks the whole track; here the chunks cover the first
    120 s that data.py decodes and caches. Chunk projections are averaged before
    L2 normalization, so the fusion MLP receives the same kind of input as in training.
    """
    rows = list(range(len(catalog))) if rows is None else list(rows)
    dataset = SongDataset(catalog, rows, cache)
    if len(dataset) != len(rows):  # songs whose audio failed in prepare: no embedding, so say which
        lost = sorted(set(rows) - set(dataset.rows))
        raise ValueError(f"{catalog.path}: {len(lost)} songs have no log-mel in the cache (failed to decode), "
                         f"e.g. {[catalog[r].song_id for r in lost[:5]]}; fix or remove them from the catalog")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=Collator(tokenizer))
    return embed_batches(model, loader, len(rows), mode, kinds, batch_size, chunk_frames)


@torch.no_grad()
def embed_batches(model, batches, total, mode=None, kinds=("audio",), batch_size=16, chunk_frames=None):
    """embed_catalog's loop over any batches of data.Collator (evals/embed_shards.py streams them
    from shards) -> {kind: (songs, D) float32 numpy} in the order of the batches."""
    mode = mode or model.cfg.embed_mode
    chunk_frames = chunk_frames or seconds_to_frames(model.cfg.chunk_seconds)
    model.eval()
    device = next(model.parameters()).device
    want_text = "text" in kinds or "fused" in kinds
    out = {k: [] for k in kinds}
    bar = progress_bar(total, f"embed ({mode})")
    for batch in batches:
        mel, mask = batch["mel"].to(device), batch["padding_mask"].to(device)
        audio = _encode_audio(model, mel, mask, mode, batch_size, chunk_frames)  # (B, D)
        text = model.encode_text({k: v.to(device) for k, v in batch["tokens"].items()}, normalize=False) \
            if want_text else None
        if "audio" in kinds:
            out["audio"].append(F.normalize(audio, dim=-1))
        if "text" in kinds:
            out["text"].append(F.normalize(text, dim=-1))
        if "fused" in kinds:
            out["fused"].append(model.fuse(audio, text))  # fuse takes the un-normalized projections
        bar.update(len(mel))
    bar.close()
    return {k: torch.cat(v).float().cpu().numpy() for k, v in out.items()}


def _encode_audio(model, mel, mask, mode, batch_size, chunk_frames=CHUNK_FRAMES):
    """(B, T, M) padded log-mels -> (B, D) un-normalized audio projections, whole song or 10 s windows."""
    if mode == "full":
        return model.encode_audio(mel, mask, normalize=False)  # (B, D)
    if mode == "chunked":
        return _encode_chunked(model, mel, mask, chunk_frames, MIN_FRAMES, batch_size)
    raise ValueError(f"unknown embed mode {mode!r} (full, chunked)")


def _encode_chunked(model, mel, mask, chunk_frames, min_frames, batch_size):
    """(B, T, M) padded songs -> (B, D): mean of the un-normalized projections of their 10 s windows."""
    chunks, owner = [], []
    for b, length in enumerate((~mask).sum(1).tolist()):
        starts = list(range(0, length, chunk_frames))
        for s in starts:
            n = min(chunk_frames, length - s)
            if n >= min_frames or s == 0:
                chunks.append(mel[b, s:s + n])
                owner.append(b)
    owner = torch.tensor(owner, device=mel.device)
    embs = []
    for i in range(0, len(chunks), batch_size * 4):
        part = chunks[i:i + batch_size * 4]
        T = max(min_frames, max(len(c) for c in part))
        x = mel.new_zeros(len(part), T, mel.shape[2])
        pad = torch.ones(len(part), T, dtype=torch.bool, device=mel.device)
        for j, c in enumerate(part):
            x[j, :len(c)] = c
            pad[j, :len(c)] = False
        embs.append(model.encode_audio(x, pad, normalize=False))
    embs = torch.cat(embs)  # (n_chunks, D)
    total = embs.new_zeros(mel.shape[0], embs.shape[1]).index_add_(0, owner, embs)
    return total / torch.bincount(owner, minlength=mel.shape[0]).clamp(min=1)[:, None].to(embs.dtype)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, batch_size=64):
    """Free texts (e.g. tag names for T2M) through the text tower -> (len(texts), D) normalized numpy."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size]), padding="longest", truncation=True, max_length=512,
                           return_tensors="pt")
        out.append(model.encode_text({k: v.to(device) for k, v in tokens.items()}))
    return torch.cat(out).float().cpu().numpy()


def save_embeddings(folder, ids, embeddings, meta=None, provenance=None):
    """folder/ids.txt + folder/{kind}.npy (float32) for each kind; meta -> folder/meta.json;
    provenance (embedding_provenance) -> folder/provenance.json."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ids.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in ids))
    for kind, x in embeddings.items():
        np.save(os.path.join(folder, f"{kind}.npy"), np.asarray(x, dtype=np.float32))
    for kind in set(KINDS) - set(embeddings):  # another kind from an earlier run would not match these ids
        if os.path.exists(os.path.join(folder, f"{kind}.npy")):
            os.remove(os.path.join(folder, f"{kind}.npy"))
    if meta is not None:
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
    if provenance is not None:
        write_json(os.path.join(folder, PROVENANCE), {**provenance, "kinds": sorted(embeddings)})


# -----------------------------------------------------------------------------
# Provenance: where an embedding came from. An embedding is only comparable with another one (a
# query with a catalog, an index with its vectors, T2M text with songs) made by the same weights,
# from the same log-mels, in the same embed mode. `embed` writes FOLDER/provenance.json, and
# `embed --index faiss` KIND.faiss.json beside each index:
#   {"artifact": abs path, "artifact_sha256": sha256(model.safetensors bytes + config.json bytes),
#    "mel": {sample_rate, n_fft, hop_length, n_mels, max_frames, top_db}, "embed_mode": full|chunked,
#    "chunk_seconds": float or null (full), "kinds": [...] (folder) / "kind" + "embeddings_sha256" (index)}
# check_provenance(a, b) is the one comparison search, matching, report and retrieval use.

PROVENANCE = "provenance.json"
_DIGESTS = {}  # (path, size, mtime_ns) of both files -> digest: an artifact is hashed once a process


def mel_settings():
    """The log-mel front end every embedding of this code base is computed from (data.py)."""
    return {"sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop_length": HOP_LENGTH, "n_mels": N_MELS,
            "max_frames": MAX_FRAMES, "top_db": TOP_DB}


def artifact_digest(folder):
    """sha256 of an artifact's model.safetensors then config.json: its weights and its config."""
    paths = [os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")]
    key = tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def embedding_provenance(folder, model, mode=None, chunk_seconds=None):
    """What an embedding of artifact `folder` (loaded as `model`) in `mode` depends on.
    mode None: the artifact's embed_mode; chunk_seconds None: the artifact's chunk_seconds."""
    mode = mode or model.cfg.embed_mode
    chunk = None if mode == "full" else float(chunk_seconds or model.cfg.chunk_seconds)
    return {"artifact": os.path.abspath(folder), "artifact_sha256": artifact_digest(folder), "mel": mel_settings(),
            "embed_mode": mode, "chunk_seconds": chunk}


def read_json(path, what="a JSON object", expect=dict):
    """A JSON file -> its value; a truncated or malformed file, or one of another type, is one error
    naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         f"expected {what}") from None
    if not isinstance(value, expect):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}, expected {what}")
    return value


def write_json(path, value):
    """Written to a temporary file, then renamed: a reader never sees half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def read_provenance(spec):
    """provenance.json of an `embed` folder (or NAME.provenance.json beside NAME.npy) -> dict or None."""
    if not os.path.isdir(spec) and not spec.endswith(".npy"):
        return None  # random[:D]: made here, from no artifact
    path = os.path.join(spec, PROVENANCE) if os.path.isdir(spec) else spec[:-len(".npy")] + ".provenance.json"
    return read_json(path, "an embedding provenance record") if os.path.exists(path) else None


PROVENANCE_KEYS = ("artifact_sha256", "mel", "embed_mode", "chunk_seconds", "kind")


def check_provenance(a, b, a_name, b_name, keys=PROVENANCE_KEYS):
    """Refuse two embedding sources that disagree on what they were made from: one line naming both
    sides and the first setting that differs. A key that either side does not record is not compared."""
    for key in keys:
        if key in a and key in b and a[key] != b[key]:
            if key == "artifact_sha256":
                what = (f"were made by different weights: {a_name} by {a.get('artifact', '?')} "
                        f"(sha256 {a[key][:12]}), {b_name} by {b.get('artifact', '?')} (sha256 {b[key][:12]})")
            else:
                what = f"differ in {key}: {a[key]} ({a_name}) vs {b[key]} ({b_name})"
            raise ValueError(f"{a_name} and {b_name} {what}; re-run `evaluate.py embed` so both come from "
                             f"the same artifact and settings")


def song_embeddings_provenance(spec):
    """The provenance of saved embeddings (checked not stale) -> dict, or None where none is recorded.
    A folder written before provenance.json existed: the mode its meta.json names, nothing more."""
    prov = read_provenance(spec)
    if prov is not None:
        check_not_stale(spec, prov)
        return prov
    meta_path = os.path.join(spec, "meta.json") if os.path.isdir(spec) else ""
    meta = read_json(meta_path, "embed's meta.json") if os.path.exists(meta_path) else {}
    if not meta.get("mode"):
        return None
    frames = meta.get("chunk_frames")
    return {"embed_mode": meta["mode"], "chunk_seconds": frames * HOP_LENGTH / SAMPLE_RATE if frames else None}


def check_not_stale(spec, prov):
    """An `embed` folder whose artifact has since been retrained (or replaced) at the same path is
    refused: its vectors no longer belong to the model its provenance names."""
    art = prov.get("artifact")
    if art and is_artifact(art) and "artifact_sha256" in prov:
        check_provenance(prov, {"artifact": art, "artifact_sha256": artifact_digest(art)},
                         f"{spec} (embedded)", f"the artifact now at {art}", keys=("artifact_sha256",))


def read_ids(path):
    """One id per line -> list; empty lines inside, or duplicates, are errors naming the line.
    Read as catalogs are read (data.load_catalog): a UTF-8 BOM is skipped, each id is stripped."""
    with open(path, encoding="utf-8-sig") as f:
        ids = [i.strip() for i in f.read().splitlines()]
    while ids and ids[-1] == "":
        ids.pop()
    seen = {}
    for line, i in enumerate(ids, start=1):
        if i == "":
            raise ValueError(f"{path}: line {line} is empty; expected one id per line")
        if i in seen:
            raise ValueError(f"{path}: id '{i}' on line {seen[i]} and again on line {line}")
        seen[i] = line
    return ids


def load_embeddings(spec, kind="audio"):
    """An embeddings file or `embed` folder -> (ids, (N, D) float32). See this module's docstring."""
    if os.path.isdir(spec):
        ids_path, npy_path = os.path.join(spec, "ids.txt"), os.path.join(spec, f"{kind}.npy")
        if not os.path.exists(ids_path):
            raise FileNotFoundError(f"{spec}: neither an embeddings folder from `embed` (no ids.txt) nor an "
                                    f"artifact (no config.json)")
        if not os.path.exists(npy_path):
            have = [k for k in KINDS if os.path.exists(os.path.join(spec, f"{k}.npy"))]
            raise FileNotFoundError(f"{spec}: no {kind}.npy (has: {', '.join(have) or 'none'}); "
                                    f"re-run embed with --text/--fused, or pick --kind")
    elif spec.endswith(".npy"):
        npy_path, ids_path = spec, spec[:-len(".npy")] + ".ids.txt"
    else:
        raise ValueError(f"{spec}: not an embeddings folder (ids.txt + audio.npy), a NAME.npy file, "
                         f"an artifact folder (config.json) or random[:D]")
    if not os.path.exists(npy_path):
        raise FileNotFoundError(f"{npy_path}: no such file")
    if not os.path.exists(ids_path):
        raise FileNotFoundError(f"{npy_path}: no ids file {ids_path} (one song_id a line, in row order)")
    try:
        x = np.load(npy_path, allow_pickle=False)  # never unpickle: a .npy can carry code
    except ValueError as e:  # an object (pickled) array, or not a .npy at all
        raise ValueError(f"{npy_path}: not a plain numeric .npy ({e}); save it with "
                         f"np.save(path, array.astype(np.float32))") from None
    ids = read_ids(ids_path)
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise ValueError(f"{npy_path}: shape {x.shape}, expected ({len(ids)}, D) to match the {len(ids)} ids "
                         f"of {ids_path}")
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise ValueError(f"{npy_path}: {int(bad.sum())} rows hold NaN/inf, e.g. row {int(np.argmax(bad))} "
                         f"(id '{ids[int(np.argmax(bad))]}')")
    return ids, x.astype(np.float32)


def align(ids, x, wanted, source, what="song"):
    """Rows of x reordered to `wanted` ids -> (len(wanted), D). A wanted id without a row is an error."""
    index = {i: r for r, i in enumerate(ids)}
    missing = [w for w in wanted if w not in index]
    if missing:
        raise ValueError(f"{source}: no embedding for {len(missing)} of {len(wanted)} {what}s, "
                         f"e.g. {', '.join(missing[:5])}")
    extra = len(ids) - len(wanted)
    if extra > 0:
        print(f"{source}: {extra} embedded {what}s are not in the evaluated set and are ignored")
    return x[[index[w] for w in wanted]]


def random_embeddings(n, dim=100, seed=0):
    """The chance baseline: seeded Gaussian vectors (unit-normalized by every cosine and by DIN)."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def is_artifact(spec):
    return os.path.isdir(spec) and os.path.exists(os.path.join(spec, "config.json")) \
        and not os.path.exists(os.path.join(spec, "ids.txt"))


def song_embeddings(spec, catalog, kind="audio", mode=None, cache=None, batch_size=16):
    """Any embedding source -> (len(catalog), D) float32, row r = catalog song r.
    mode (artifacts only): full | chunked | None = what the artifact was trained for."""
    if spec == "random" or spec.startswith("random:"):
        dim = spec.split(":", 1)[1] if ":" in spec else "100"
        if not dim.isdigit() or int(dim) < 1:
            raise ValueError(f"--emb {spec}: expected random or random:D with D a positive integer")
        return random_embeddings(len(catalog), int(dim))
    from evals.baselines import baseline_embeddings, is_baseline
    if is_baseline(spec):
        return baseline_embeddings(spec, catalog, mode, cache, batch_size)
    if is_artifact(spec):
        model, tokenizer = load_artifact(spec, DEVICE, text=kind != "audio")
        print(f"{spec}: embedding {len(catalog)} songs ({kind}, {mode or model.cfg.embed_mode}); "
              f"save them once with `embed` to skip this")
        return embed_catalog(model, tokenizer, catalog, mode=mode, kinds=(kind,), cache=cache,
                             batch_size=batch_size)[kind]
    prov = song_embeddings_provenance(spec)
    if prov:
        if kind not in prov.get("kinds", [kind]):
            raise ValueError(f"{spec}: its {PROVENANCE} records kinds {', '.join(prov['kinds'])}, not {kind}; "
                             f"re-run embed with --{kind}")
        if mode and prov.get("embed_mode") and mode != prov["embed_mode"]:
            raise ValueError(f"--mode {mode} asks for {mode} embeddings, but {spec} holds {prov['embed_mode']} "
                             f"ones ({PROVENANCE}); leave out --mode or re-run embed --mode {mode}")
    ids, x = load_embeddings(spec, kind)
    return align(ids, x, [s.song_id for s in catalog.songs], spec)


# -----------------------------------------------------------------------------
# Readers of the evaluation logs. A malformed value is an error naming the file,
# line and column; a song missing from the catalog is dropped and counted
# aloud (as data.load_favourites does), never silently.


def read_records(path, required):
    """A CSV/JSONL log with the `required` columns -> [(line, {column: value})], as data.py reads them:
    a malformed file is an error naming the file, line and column."""
    return _read_records(str(path), required)[1]


def _parse(path, line, column, value, kind):
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{path}: line {line}, column '{column}': cannot read {value!r} as "
                         f"{getattr(kind, '__name__', kind)}") from None


def _flag(value):
    v = value.strip().lower()
    if v in ("1", "true", "yes", "y", "positive", "pos"):
        return True
    if v in ("0", "false", "no", "n", "negative", "neg", ""):
        return False
    raise ValueError(value)


def _drop_unknown(path, catalog, dropped, total):
    if dropped:
        first = "; ".join(f"line {line}: '{sid}'" for line, sid in dropped[:5])
        print(f"WARNING {path}: dropped {len(dropped)} of {total} rows naming a song not in {catalog.path}; "
              f"first: {first}", file=sys.stderr)


def read_impressions(path, catalog):
    """impressions CSV (user_id, song_id, day, clicked, favoured) -> dict of parallel numpy arrays."""
    records = read_records(path, ("user_id", "song_id", "day", "clicked", "favoured"))
    out = {k: [] for k in ("user_id", "row", "day", "clicked", "favoured")}
    dropped = []
    for line, rec in records:
        sid = rec["song_id"].strip()
        day = _parse(path, line, "day", rec["day"].strip(), int)
        clicked = _parse(path, line, "clicked", rec["clicked"], _flag)
        favoured = _parse(path, line, "favoured", rec["favoured"], _flag)
        if sid not in catalog.index:
            dropped.append((line, sid))
            continue
        out["user_id"].append(rec["user_id"].strip())
        out["row"].append(catalog.index[sid])
        out["day"].append(day)
        out["clicked"].append(clicked)
        out["favoured"].append(favoured)
    _drop_unknown(path, catalog, dropped, len(records))
    out = {k: np.asarray(v, dtype=object if k == "user_id" else None) for k, v in out.items()}
    odd = int((out["favoured"] & ~out["clicked"]).sum()) if len(out["row"]) else 0
    if odd:
        print(f"WARNING {path}: {odd} impressions are favoured but not clicked; CVR only sees clicked ones",
              file=sys.stderr)
    return out


def read_labelled_pairs(path, catalog, seed=0):
    """Figure 2 pairs -> (anchors, songs, is_positive) catalog rows. Two formats:
      anchor,song,label                 label positive/negative (or 1/0), as in Figure 2
      trigger_song_id,rec_song_id       stage-2 pairs (data.py): every pair is a positive, and each
                                        gets one negative, a seeded random song of the catalog
    NOTE(paper): the paper's negatives are recommended songs the user did not favour; random
    songs are easier negatives, so prefer a labelled file or --impressions where there is one.
    """
    columns, records = _read_records(str(path), ())
    labelled = all(c in columns for c in ("anchor", "song", "label"))
    if not labelled and not all(c in columns for c in ("trigger_song_id", "rec_song_id")):
        raise ValueError(f"{path}: line 1 (header): expected columns anchor,song,label or "
                         f"trigger_song_id,rec_song_id; found: {', '.join(columns)}")
    a_col, s_col = ("anchor", "song") if labelled else ("trigger_song_id", "rec_song_id")
    anchors, songs, labels, dropped = [], [], [], []
    for line, rec in records:
        a, s = rec.get(a_col, "").strip(), rec.get(s_col, "").strip()
        label = _parse(path, line, "label", rec["label"], _flag) if labelled else True
        if a not in catalog.index or s not in catalog.index:
            dropped.append((line, a if a not in catalog.index else s))
            continue
        anchors.append(catalog.index[a])
        songs.append(catalog.index[s])
        labels.append(label)
    _drop_unknown(path, catalog, dropped, len(records))
    if not labelled:
        rng = np.random.default_rng(seed)
        negatives = rng.integers(0, len(catalog), len(anchors))
        while True:  # never the anchor or its positive
            clash = (negatives == np.array(anchors)) | (negatives == np.array(songs))
            if not clash.any():
                break
            negatives[clash] = (negatives[clash] + 1) % len(catalog)
        print(f"{path}: no label column, so its {len(anchors)} pairs are positives, each with one random "
              f"negative song (seed {seed})")
        anchors, songs = anchors + anchors, songs + negatives.tolist()
        labels = labels + [False] * len(negatives)
    return np.array(anchors, dtype=np.int64), np.array(songs, dtype=np.int64), np.array(labels, dtype=bool)


# -----------------------------------------------------------------------------
# Value checks for the command lines, at parse time: a bad sign or type is argparse's one-line
# usage error naming the flag, before any file is read.


positive_int = number_type(1, name="a positive integer")
non_negative_int = number_type(0, name="an integer >= 0")
positive_float = number_type(0.0, float, name="a positive number", open_low=True)
non_negative_float = number_type(0.0, float, name="a number >= 0")
fraction = number_type(0.0, float, 1.0, name="a fraction between 0 and 1", open_low=True, open_high=True)


# -----------------------------------------------------------------------------
# The command line every sub-command shares: it loads the catalog and every --emb once.


def row_name(spec):
    """Row name of an --emb: the file or folder name; an artifact's final/ folder is named after
    its run (runs/demo/pretrain/final -> pretrain), so stage-1 and stage-2 rows differ."""
    from evals.baselines import baseline_name, is_baseline
    if is_baseline(spec):
        return baseline_name(spec)
    path = os.path.normpath(spec)
    base = os.path.basename(path)
    if base == "final" and os.path.dirname(path):
        base = os.path.basename(os.path.dirname(path))
    return base[:-len(".npy")] if base.endswith(".npy") else base


def row_names(specs):
    """Unique row names, in order; a clash falls back to the full spec."""
    out = []
    for spec in specs:
        out.append(row_name(spec) if row_name(spec) not in out else spec)
    return out


def load_inputs(args):
    """--catalog and --cache of a sub-command -> (catalog, log-mel cache or None)."""
    catalog = load_catalog(args.catalog)
    cache = MelCache.open(args.cache, catalog) if getattr(args, "cache", None) else None
    return catalog, cache


def embeddings_of(args, catalog, cache):
    """{name: (len(catalog), D)} for each --emb, in the order given."""
    return {name: song_embeddings(spec, catalog, args.kind, args.mode, cache, args.batch_size)
            for name, spec in zip(row_names(args.emb), args.emb)}


def catalog_column(catalog, column):
    """One catalog column, a string per song; a missing column stops the command."""
    if column not in catalog.columns:
        raise SystemExit(f"{catalog.path}: no column '{column}' (columns: {', '.join(catalog.columns)})")
    return [catalog.label(r, column) for r in range(len(catalog))]


def add_command(subparsers, name, fn, help, source=True):
    """A sub-command's parser with --json; with `source`, also the embedding-source flags
    (--catalog, --emb, --kind, --mode, --cache, --batch_size) that embeddings_of reads."""
    q = subparsers.add_parser(name, help=help, description=help)
    q.set_defaults(fn=fn)
    q.add_argument("--json", help="also write the results to this JSON file")
    if source:
        q.add_argument("--catalog", required=True, help="catalog CSV/JSONL (data.py format)")
        q.add_argument("--emb", action="append", required=True,
                       help="embeddings: embed folder, NAME.npy (+ NAME.ids.txt), artifact folder, or "
                            "random[:D]; repeat to compare")
        q.add_argument("--kind", default="audio", choices=KINDS, help="which embedding of a folder/artifact")
        q.add_argument("--mode", default=None, choices=["full", "chunked"],
                       help="an artifact embedded on the fly: whole song (HTCL) or mean of 10 s chunks "
                            "(CrossMuSim); default: the mode the artifact was trained for")
        q.add_argument("--cache", help="log-mel cache folder (data.py prepare) for artifacts")
        q.add_argument("--batch_size", type=positive_int, default=16, help="songs per forward pass when embedding")
    return q
