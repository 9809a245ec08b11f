#!/bin/sh
# Regenerates this folder's synthetic world (catalog.csv, audio/, favourites.csv, pairs.csv,
# impressions.csv, artist_graph.csv, artist_split.csv, tiny-bert/) byte for byte; ~70 s on 2 cores.
# Run from anywhere. preset.toml, the .sh scripts and crossmusim.toml are not touched.
# (tiny-bert/config.json records the transformers version that wrote it: that line follows yours.)
set -e
cd "$(dirname "$0")"
python make_world.py --out . --songs 640 --users 250 --seed 3407 --artists 60 --max_pairs 4000
