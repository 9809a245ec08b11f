"""Tests of sample_data/make_world.py, the synthetic world the demo, the smoke test and the
Table 2 reproduction train on: deterministic for a seed, and its files load as catalogs do.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_make_world.py
"""
import filecmp
import os

import data

from tests.helpers import world_gen


def test_make_world_is_deterministic_and_its_files_load(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for out in (a, b):
        world_gen.make_world(out, songs=14, users=3, seed=11, artists=6, max_pairs=50)
    for name in ["catalog.csv", "favourites.csv", "pairs.csv", "impressions.csv", "artist_graph.csv",
                 "artist_split.csv", "tiny-bert/tokenizer.json", "tiny-bert/tokenizer_config.json",
                 "tiny-bert/config.json"]:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name
    cat = data.load_catalog(os.path.join(a, "catalog.csv"))
    for song in cat.songs:
        assert filecmp.cmp(song.audio, song.audio.replace(a, b), shallow=False), song.audio
        assert song.labels["hidden_factor"] not in song.text  # the hidden factor is never written
    favs = data.load_favourites(os.path.join(a, "favourites.csv"), cat)
    assert len(favs) == 3 * 13  # 35-60 favourites, capped at songs - 1 for this tiny world
    train = set(data.split_rows(cat, "train"))
    pairs = data.load_pairs(os.path.join(a, "pairs.csv"), cat)
    assert all(t in train and r in train for t, r in pairs)
    # pairs are the similar-songs channel's (trigger = the previous favourite, favourite): some of
    # the consecutive favourites, never a pair of non-consecutive ones
    by_user = {}
    for user, row, _ in favs:  # sorted by user, then time
        by_user.setdefault(user, []).append(row)
    consecutive = {(seq[i], seq[i + 1]) for seq in by_user.values() for i in range(len(seq) - 1)}
    assert set(pairs) <= consecutive and pairs
    assert len(pairs) < len({(t, r) for t, r in consecutive if t in train and r in train})  # ~half: one channel
    from transformers import AutoConfig, AutoTokenizer
    tok, cfg = AutoTokenizer.from_pretrained(os.path.join(a, "tiny-bert")), AutoConfig.from_pretrained(os.path.join(a, "tiny-bert"))
    assert cfg.vocab_size == len(tok) and cfg.hidden_size == 64
    assert tok.unk_token_id not in tok(cat[0].text)["input_ids"]
