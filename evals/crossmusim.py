"""The CrossMuSim retrieval protocol (text-guided music similarity) on song-embedding matrices.

  M2M: each song queries the others by cosine; songs with the same tag are
       positives; mAP@100, one tag column at a time (coarse: genre, fine: sub-genre).
  T2M: each tag value, as text, queries the songs through the text tower;
       R@1, R@5 and mAP@10.
  NOTE(paper): with many relevant songs per tag, R@K is read as "at least one
       relevant song in the top K" (hit rate), the only reading under which R@1 is informative.
  Same-artist leakage: share of queries whose top 100 holds a song by the
       query's artist, and how many such songs on average.
  Leakage control (--exclude_same COLUMN, e.g. artist_id): songs that share the
       query's value of COLUMN are neither positives nor candidates, so a model
       cannot score by recognising the artist (or the work a clip comes from).
A tag is one string per song per column; "" means untagged: never a query, never a positive.
An exclusion value "" groups nothing.

Command (from the repo root; A = a trained artifact folder, sample_data/crossmusim.sh runs it all):
  python evaluate.py retrieval --catalog sample_data/catalog.csv --emb emb/htcl --tag genre --artifact A \
      [--exclude_same artist_id]
"""
import os

import numpy as np
import torch

from data import split_rows
from evals.embeddings import (DEVICE, add_command, align, artifact_digest, catalog_column, check_provenance,
                              embed_texts, embeddings_of, is_artifact, load_embeddings, load_inputs, positive_int,
                              read_json, read_provenance, song_embeddings_provenance)
from evals.metrics import as_float_tensor, cosine_topk, map_at_k, markdown_table
from model import load_artifact


def group_codes(values):
    """Column values -> int codes, -1 for "" (no group)."""
    values = np.asarray(values, dtype=object)
    codes = np.unique(values, return_inverse=True)[1].astype(np.int64)
    return np.where(values == "", -1, codes)


@torch.no_grad()
def music_to_music_map(emb, tags, k=100, batch_size=1024, exclude_same=None):
    """mAP@k of query-by-example: (N, D), N tags -> (mAP, number of queries).
    exclude_same: N values (e.g. artists); songs sharing the query's value are left out."""
    tags = np.asarray(tags, dtype=object)
    codes = np.unique(tags, return_inverse=True)[1]
    tagged = tags != ""
    counts = np.bincount(codes[tagged], minlength=codes.max() + 1 if len(codes) else 0)
    n_relevant = counts[codes] - 1  # songs sharing the query's tag, itself excluded
    groups = None
    if exclude_same is not None:
        g = group_codes(exclude_same)
        # songs of the query's own group with its tag (itself included) are not positives
        pair = codes * (g.max() + 2) + (g + 1)
        same = np.bincount(pair[tagged & (g >= 0)], minlength=pair.max() + 1)[pair]
        n_relevant = np.where(g >= 0, counts[codes] - same, n_relevant)
    queries = np.flatnonzero(tagged & (n_relevant > 0))
    if len(queries) == 0:
        return float("nan"), 0
    if exclude_same is not None:
        groups = (g[queries], g)
    e = as_float_tensor(emb)
    scores, idx = cosine_topk(e[queries], e, k, exclude=queries, batch_size=batch_size, groups=groups)
    relevant = (codes[idx.numpy()] == codes[queries][:, None]) & np.isfinite(scores.numpy())
    return map_at_k(relevant, n_relevant[queries], k), len(queries)


def text_to_music(query_emb, query_tags, song_emb, song_tags, ks=(1, 5), map_k=10):
    """Tag-text queries (Q, D) against songs (N, D); relevant = songs carrying the query's tag.

    -> {"R@1": .., "R@5": .., "mAP@10": .., "queries": Q'} over queries with >= 1 relevant song.
    """
    song_tags = np.asarray(song_tags, dtype=object)
    query_tags = np.asarray(query_tags, dtype=object)
    n_relevant = np.array([(song_tags == t).sum() for t in query_tags])
    keep = n_relevant > 0
    if not keep.any():
        return {**{f"R@{k}": float("nan") for k in ks}, f"mAP@{map_k}": float("nan"), "queries": 0}
    _, idx = cosine_topk(as_float_tensor(query_emb)[torch.as_tensor(np.flatnonzero(keep))], song_emb,
                         max(max(ks), map_k))
    relevant = song_tags[idx.numpy()] == query_tags[keep][:, None]
    out = {f"R@{k}": float(relevant[:, :k].any(1).mean()) for k in ks}
    out[f"mAP@{map_k}"] = map_at_k(relevant, n_relevant[keep], map_k)
    out["queries"] = int(keep.sum())
    return out


def same_artist_stats(emb, artists, k=100, batch_size=1024, exclude_same=None):
    """Share of songs whose top-k neighbours hold >= 1 song by the same artist, and the mean count
    (over all queries and over the queries with >= 1). Songs with artist "" are skipped as queries.
    exclude_same: as in music_to_music_map, the candidates of the leakage control."""
    artists = np.asarray(artists, dtype=object)
    queries = np.flatnonzero(artists != "")
    groups = None if exclude_same is None else (group_codes(exclude_same)[queries], group_codes(exclude_same))
    e = as_float_tensor(emb)
    scores, idx = cosine_topk(e[queries], e, k, exclude=queries, batch_size=batch_size, groups=groups)
    same = ((artists[idx.numpy()] == artists[queries][:, None]) & np.isfinite(scores.numpy())).sum(1)
    return {"share_with_same_artist": float((same > 0).mean()), "mean_same_artist": float(same.mean()),
            "mean_same_artist_given_any": float(same[same > 0].mean()) if (same > 0).any() else 0.0,
            "queries": len(queries)}


def _own_artifact(spec):
    """The artifact an --emb came from: itself, or the one an `embed` folder's provenance.json (or,
    written before it existed, meta.json) names."""
    if is_artifact(spec):
        return spec
    meta = os.path.join(spec, "meta.json")
    record = read_provenance(spec) or (read_json(meta, "embed's meta.json") if os.path.isdir(spec) and
                                       os.path.exists(meta) else {})
    artifact = record.get("artifact")
    return artifact if artifact and is_artifact(artifact) else None


def cmd_retrieval(args):
    try:  # a bad --template now, not after every model is embedded
        args.template.format(value="rock", column="genre")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"--template {args.template!r}: {type(e).__name__} {e}; it may use {{value}} and "
                         f"{{column}} only") from None
    catalog, cache = load_inputs(args)
    embs = embeddings_of(args, catalog, cache)
    # T2M text tower of each --emb: --artifact for all, else the model's own (an artifact, or the artifact
    # of an embed folder), else (random, other models' files) the first own tower found
    own = [_own_artifact(s) for s in args.emb]
    fallback = next((a for a in own if a), None)
    towers = {name: args.artifact or a or fallback for name, a in zip(embs, own)}
    for spec, name in zip(args.emb, embs):  # T2M text and songs must come from the same weights
        prov = song_embeddings_provenance(spec) if not is_artifact(spec) else None
        if prov and towers[name] and "artifact_sha256" in prov:
            check_provenance(prov, {"artifact": towers[name], "artifact_sha256": artifact_digest(towers[name])},
                             f"--emb {spec}", f"the T2M text tower {towers[name]}", keys=("artifact_sha256",))
    loaded = {}
    text_tower = any(towers.values())
    # songs searched (and searching): the whole catalog, or one split of it
    keep = np.arange(len(catalog)) if args.split == "all" else np.array(split_rows(catalog, args.split), dtype=int)
    if len(keep) < 2:
        raise SystemExit(f"retrieval: {len(keep)} songs in split '{args.split}' of {catalog.path}")
    exclude = None if not args.exclude_same else \
        np.asarray(catalog_column(catalog, args.exclude_same), dtype=object)[keep]
    results, rows = {}, []
    for name, emb in embs.items():
        emb = emb[keep]
        for column in args.tag:
            tags = np.asarray(catalog_column(catalog, column), dtype=object)[keep]
            m2m, n = music_to_music_map(emb, tags, args.k, exclude_same=exclude)
            results[f"{name}/{column}/m2m"] = {f"mAP@{args.k}": m2m, "queries": n}
            rows.append([name, f"M2M {column}", f"mAP@{args.k} {m2m:.4f}", n])
            values = sorted(set(tags) - {""})
            queries = None
            if args.tag_emb:
                ids, x = load_embeddings(args.tag_emb)
                queries = align(ids, x, values, args.tag_emb, what="tag")
            elif towers[name]:
                if towers[name] not in loaded:
                    loaded[towers[name]] = load_artifact(towers[name], DEVICE)
                texts = [args.template.format(value=v, column=column) for v in values]
                queries = embed_texts(*loaded[towers[name]], texts)
            if queries is not None:
                t2m = text_to_music(queries, values, emb, tags)
                results[f"{name}/{column}/t2m"] = t2m
                scores = ", ".join(f"{k} {v:.4f}" for k, v in t2m.items() if k != "queries")
                rows.append([name, f"T2M {column}", scores, t2m["queries"]])
        artist_column = args.artist_column
        if artist_column is None:  # default: artist_id when the catalog has it
            artist_column = "artist_id" if "artist_id" in catalog.columns else ""
        if artist_column:
            sa = same_artist_stats(emb, np.asarray(catalog_column(catalog, artist_column), dtype=object)[keep], args.k,
                                   exclude_same=exclude)
            results[f"{name}/same_artist"] = sa
            rows.append([name, f"same artist in top {args.k}",
                         f"{100 * sa['share_with_same_artist']:.2f}% of queries, {sa['mean_same_artist']:.2f} songs "
                         f"on average ({sa['mean_same_artist_given_any']:.2f} where any)", sa["queries"]])
    print(markdown_table(["emb", "protocol", "score", "queries"], rows))
    if not text_tower and not args.tag_emb:
        print("retrieval: T2M skipped (no text tower: pass --artifact or --tag_emb)")
    return results


def add_parser(subparsers):
    """The `retrieval` sub-command."""
    q = add_command(subparsers, "retrieval", cmd_retrieval,
                    "CrossMuSim: M2M mAP@K, T2M R@1/R@5/mAP@10, same-artist leakage")
    q.add_argument("--tag", action="append", required=True,
                   help="tag column; repeat for several, e.g. genre (coarse), subgenre (fine)")
    q.add_argument("--k", type=positive_int, default=100, help="K of M2M mAP@K and of the same-artist top K")
    q.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                   help="search within these catalog rows only")
    q.add_argument("--artist_column", default=None,
                   help="column naming a song's artist (default: artist_id if present; '' skips the statistic)")
    q.add_argument("--artifact", help="text tower for T2M queries of every --emb (default: each model's own "
                                      "artifact; for random and plain files the first one given)")
    q.add_argument("--tag_emb", help="T2M query embeddings NAME.npy whose ids file holds the tag values")
    q.add_argument("--template", default="{value}", help="T2M query text, e.g. '{column}: {value}'")
    q.add_argument("--exclude_same", metavar="COLUMN", default=None,
                   help="leakage control: songs sharing the query's value of COLUMN (e.g. artist_id) are neither "
                        "positives nor candidates in M2M and the same-artist statistic")
    return q
