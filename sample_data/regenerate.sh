#!/bin/sh
# Regenerates this folder's synthetic world (catalog.csv, audio/, favourites.csv, pairs.csv,
# impressions.csv, artist_graph.csv, artist_split.csv, tiny-bert/) byte for byte; ~70 s on 2 cores.
# Run from the repository root. preset.toml and demo.sh are not touched.
set -e
python data.py synth --out sample_data --songs 640 --users 250 --seed 3407 --artists 60 --max_pairs 4000
