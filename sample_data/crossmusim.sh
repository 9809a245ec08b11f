#!/usr/bin/env bash
# The CrossMuSim training variant (docs/PAPER.md) on the bundled synthetic world,
# on CPU, in a few minutes, next to HTCL's stage 1 and random vectors:
#   prepare the log-mel cache -> [HTCL stage 1, as demo.sh runs it, if runs/demo/pretrain/final is
#   missing] -> the variant (pretrain.py --preset sample_data/crossmusim.toml) -> song embeddings
#   (each model in the mode its artifact records) -> retrieval: M2M mAP@100 on genre, T2M
#   R@1/R@5/mAP@10 with genre names as queries, same-artist ratio in the top 100, and M2M again
#   with the same-artist leakage control.
# Run from anywhere, inside the environment made by the README's first command:
#   bash sample_data/crossmusim.sh
# Writes runs/crossmusim/ (results.json: {model: {metric: value}}); reuses runs/demo/cache and
# runs/demo/pretrain. Each command is printed before it runs.
# An earlier run's training is never deleted unless --force is given (bash sample_data/crossmusim.sh -h).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash sample_data/crossmusim.sh [--force] [-h | --help]
The CrossMuSim variant on sample_data: trains it (runs/crossmusim/train/), embeds it and HTCL's
stage 1, and scores both and random vectors with evaluate.py retrieval (runs/crossmusim/).
  --force      replace an earlier run in runs/crossmusim/ (without it, an earlier
               runs/crossmusim/train/ stops the script before it does anything)
  -h, --help   this text
EOF
}
FORCE=0
for arg in "$@"; do  # every argument is read before any work
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        --force) FORCE=1 ;;
        *) echo "crossmusim.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
if [ -e runs/crossmusim/train ] && [ "$FORCE" != 1 ]; then
    echo "crossmusim.sh: runs/crossmusim/train holds an earlier run; pass --force to replace it, or move it away" >&2
    exit 2
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # as in demo.sh: tiny matrices, busy machines
export TOKENIZERS_PARALLELISM=false
LAUNCH="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --cpu"
OUT=runs/crossmusim

run() { echo; echo "+ $*"; "$@"; }
start=$(date +%s)

run python data.py prepare --catalog sample_data/catalog.csv --cache runs/demo/cache  # resumable: quick when done
if [ ! -f runs/demo/pretrain/final/config.json ]; then
    run $LAUNCH pretrain.py --preset sample_data/preset.toml  # demo.sh's stage 1
fi
if [ "$FORCE" = 1 ] && [ -e "$OUT" ]; then  # a fresh run (pretrain.py would otherwise append to its log)
    echo "--force: removing the earlier run in $OUT"; rm -rf "$OUT"
fi
run $LAUNCH pretrain.py --preset sample_data/crossmusim.toml
run python evaluate.py embed --artifact "$OUT/train/final" --catalog sample_data/catalog.csv \
    --cache runs/demo/cache --out "$OUT/emb/crossmusim"  # chunked: the artifact's embed_mode
run python evaluate.py embed --artifact runs/demo/pretrain/final --catalog sample_data/catalog.csv \
    --cache runs/demo/cache --out "$OUT/emb/htcl_stage1"  # full songs
for control in "" "--exclude_same artist_id"; do
    name=$([ -z "$control" ] && echo retrieval || echo retrieval_excl_artist)
    # shellcheck disable=SC2086  # $control is two words or none
    run python evaluate.py retrieval --catalog sample_data/catalog.csv --tag genre --k 100 \
        --emb "$OUT/emb/crossmusim" --emb "$OUT/emb/htcl_stage1" --emb random $control --json "$OUT/$name.json"
done

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
res = json.load(open(f"{out}/retrieval.json"))["results"]
excl = json.load(open(f"{out}/retrieval_excl_artist.json"))["results"]
table = {}
for model in ("crossmusim", "htcl_stage1", "random"):
    t2m = res[f"{model}/genre/t2m"]
    table[model] = {"m2m_map@100": res[f"{model}/genre/m2m"]["mAP@100"], "t2m_R@1": t2m["R@1"],
                    "t2m_R@5": t2m["R@5"], "t2m_map@10": t2m["mAP@10"],
                    "same_artist_ratio": res[f"{model}/same_artist"]["share_with_same_artist"]}
json.dump(table, open(f"{out}/results.json", "w"), indent=2)
print("\nCrossMuSim protocol on all 640 synthetic songs (genre = coarse tag; 6 genre-name T2M queries):")
print(f"  {'model':12s} {'M2M mAP@100':>12s} {'(excl. artist)':>15s} {'T2M R@1':>8s} {'R@5':>6s} "
      f"{'mAP@10':>7s} {'same-artist':>12s}")
for model, m in table.items():
    print(f"  {model:12s} {m['m2m_map@100']:12.4f} {excl[f'{model}/genre/m2m']['mAP@100']:15.4f} "
          f"{m['t2m_R@1']:8.3f} {m['t2m_R@5']:6.3f} {m['t2m_map@10']:7.4f} {m['same_artist_ratio']:11.1%}")
print(f"results: {out}/results.json")
PY
echo "crossmusim demo finished in $(( $(date +%s) - start )) s"
