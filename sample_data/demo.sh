#!/usr/bin/env bash
# The whole HTCL pipeline on the bundled synthetic world, on CPU, in a few minutes:
#   prepare the log-mel cache -> stage 1 (pretrain.py) -> stage 2 (finetune.py) -> evaluation.
# Run from anywhere, inside the environment made by the README's first command:
#   bash sample_data/demo.sh
# Everything it writes goes to runs/demo/, and a re-run starts the demo afresh (--overwrite on both
# stages: the training scripts refuse a non-empty out_dir otherwise). Each command is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The demo's matrices are tiny: a second intra-op thread gains little and, on a busy
# machine, spin-waiting OpenMP threads can make a step 10x slower. Override freely.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
# One process on the CPU: plain python runs the same Accelerate code path as `accelerate launch`
# (which is for several processes or GPUs; README "Paper-scale commands") without the launcher's
# own start-up, measured at 5 s a stage.

run() { echo; echo "+ $*"; local t=$(date +%s); "$@"; echo "($(( $(date +%s) - t )) s)"; }
start=$(date +%s)

run python data.py prepare --catalog sample_data/catalog.csv --cache runs/demo/cache --num_workers 2
REPORT="python evaluate.py report --catalog sample_data/catalog.csv --cache runs/demo/cache"
REPORT+=" --favourites sample_data/favourites.csv --impressions sample_data/impressions.csv --out runs/demo/report"

run python pretrain.py --preset sample_data/preset.toml --overwrite
# Stage 2 trains on one core; the other would idle. Meanwhile, evaluate stage 1 and the random
# baseline on it: the final report reuses those rows (same embeddings and inputs: results.json).
mkdir -p runs/demo/report
echo; echo "+ $REPORT --emb runs/demo/pretrain/final --emb random --workers 1 > runs/demo/report/stage1.log &"
$REPORT --emb runs/demo/pretrain/final --emb random --workers 1 > runs/demo/report/stage1.log 2>&1 &
stage1_report=$!
trap 'kill $stage1_report 2> /dev/null || true' EXIT  # a failed stage 2 leaves no report running
run python finetune.py --preset sample_data/preset.toml --overwrite
wait $stage1_report || { echo "the stage-1 report failed: see runs/demo/report/stage1.log"; exit 1; }
run $REPORT --emb runs/demo/pretrain/final --emb runs/demo/finetune/final --emb random

echo
echo "Held-out audio->text retrieval on the val split (chance R@10 = 10 / number of songs):"
for stage in pretrain finetune; do
    python - "$stage" <<'PY'
import json, sys
stage = sys.argv[1]
rows = [json.loads(l) for l in open(f"runs/demo/{stage}/log.jsonl")]
last = [r for r in rows if "a2t_R@10" in r][-1]
print(f"  {stage:9s} a2t R@1 {last['a2t_R@1']:.3f}  a2t R@10 {last['a2t_R@10']:.3f}  "
      f"(chance {last['chance_R@10']:.3f}, {last['val_songs']} songs)  val loss {last['val_loss']:.3f}")
PY
done
echo
echo "Table 2 (above): runs/demo/report/table2.md (numbers: table2.json), Figure 2: runs/demo/report/figure2.png"
echo "demo finished in $(( $(date +%s) - start )) s"
