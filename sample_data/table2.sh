#!/usr/bin/env bash
# HTCL Table 2 (Sec. 3.2) in full on the bundled synthetic world, as mean ± std over 3 seeds:
#   per seed, ONE stage-1 artifact (pretrain.py), and from it three stage-2 runs (finetune.py):
#     htcl          the paper's HTCL, on sample_data/pairs.csv (favoured <trigger, rec> pairs)
#     htcl_wo_text  HTCL_w/o_text: the same pairs, L_aa only (--no-use_text)
#     htcl_w_cf     HTCL_w_CF: pairs mined by `data.py mine-pairs` from the favourites log
#   then evaluate.py report per seed, and evaluate.py table2 over the seeds: the table, the
#   paper's claims as met/missed targets, and Figure 2 (pooled over seeds).
# Run from anywhere, inside the environment made by the README's first command:
#   bash sample_data/table2.sh
# Everything it writes goes to runs/table2/ (each run's log in runs/table2/s<seed>/<run>.log).
# The stages use the demo's settings (sample_data/preset.toml); only seeds, paths and the
# stage-2 length (STAGE2_EPOCHS, below) differ.
# Runs go JOBS at a time (default 2: one per core, each single-threaded).
# An earlier run's outputs are never replaced unless --force is given (bash sample_data/table2.sh -h).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash sample_data/table2.sh [--force] [-h | --help]
HTCL Table 2 over seeds on sample_data: stage 1, three stage-2 runs and a report per seed, then
evaluate.py table2 over the seeds. Writes runs/table2/.
  --force      replace an earlier run in runs/table2/ (its seed folders, table2.*, figure2.png,
               times.txt, cf_pairs.csv; the log-mel cache is kept). Without it an earlier run stops
               the script before it does anything.
  -h, --help   this text
environment:
  SEEDS          distinct positive integers (default "3407 3408 3409")
  JOBS           runs at a time, a positive integer (default 2)
  STAGE2_EPOCHS  stage-2 epochs, a positive integer (default 12)
  EVAL           extra evaluate.py report flags (default "--probe_seeds 1 --ranking_seeds 0")
EOF
}
FORCE=0
for arg in "$@"; do  # every argument is read, and every setting checked, before any work
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        --force) FORCE=1 ;;
        *) echo "table2.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done
die() { echo "table2.sh: $*" >&2; exit 2; }
positive() { [[ "$1" =~ ^[0-9]+$ ]] && (( 10#$1 > 0 )); }
SEEDS="${SEEDS:-3407 3408 3409}"
JOBS="${JOBS:-2}"
STAGE2_EPOCHS="${STAGE2_EPOCHS:-12}"
read -r -a seed_list <<< "$SEEDS"
(( ${#seed_list[@]} > 0 )) || die "SEEDS is empty; give distinct positive integers, e.g. SEEDS=\"3407 3408\""
for s in "${seed_list[@]}"; do
    positive "$s" || die "SEEDS: '$s' is not a positive integer (SEEDS=\"$SEEDS\")"
done
[ -z "$(printf '%s\n' "${seed_list[@]}" | sed 's/^0*//' | sort | uniq -d)" ] \
    || die "SEEDS: a seed is given twice (SEEDS=\"$SEEDS\"); the std over seeds needs distinct ones"
positive "$JOBS" || die "JOBS: '$JOBS' is not a positive integer"
positive "$STAGE2_EPOCHS" || die "STAGE2_EPOCHS: '$STAGE2_EPOCHS' is not a positive integer"
SEEDS="${seed_list[*]}"
cd "$(dirname "$0")/.."
OUT=runs/table2
earlier=$(ls -d "$OUT"/s[0-9]* "$OUT"/table2.md "$OUT"/table2.json 2>/dev/null | head -3 | tr '\n' ' ' || true)
if [ -s "$OUT/times.txt" ]; then earlier="$earlier$OUT/times.txt "; fi
if [ -n "$earlier" ]; then
    [ "$FORCE" = 1 ] || die "$OUT holds an earlier run (${earlier% }); pass --force to replace it, or move it away"
    echo "--force: removing the earlier run in $OUT (the log-mel cache is kept)"
    rm -rf "$OUT"/s[0-9]* "$OUT"/table2.md "$OUT"/table2.json "$OUT"/figure2.png "$OUT"/times.txt \
        "$OUT"/cpu.txt "$OUT"/cf_pairs.csv
fi

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # why one thread: see demo.sh
export TOKENIZERS_PARALLELISM=false
export OUT PRESET=sample_data/preset.toml
# One process a run: plain python, as in demo.sh (accelerate launch adds 5 s of start-up a run).
export LAUNCH="python"
# Stage 2 runs 12 epochs (600 steps), not the demo preset's 6: at 6 its validation loss is still
# falling steeply (8.75, seed 3407). The released code's 20 epochs (finetune.py's default) reach
# the plateau (6.54 at epoch 14) and give the same table within the seed spread, but would take
# ~13.7 min on two idle cores, too close to this script's 15-minute budget; 12 take ~11
# (README "Reproducing Table 2"). STAGE2_EPOCHS=20 runs the released length.
# HTCL_w_CF trains on as many pairs as HTCL (same steps): co-occurrences within 5 favourites,
# at most 25 a user before keeping train-train pairs (3,620; pairs.csv has 3,596).
CF_WINDOW=5 CF_PER_USER=25
# Evaluation: one probe run per embedding (the std is over the 3 training seeds) and no DIN
# ranking (CTR/CVR AUC): DIN costs ~3x the rest of a report. EVAL="" gives the full report.
EVAL="${EVAL-"--probe_seeds 1 --ranking_seeds 0"}"

run() { echo "+ $*"; "$@"; }
# One run (a command line), its output in $OUT/s<SEED>/<NAME>.log; one line when done. Args: SEED NAME COMMAND...
# Its CPU seconds (the children's user + sys) go to $OUT/cpu.txt: on a shared machine the wall
# time says little, while a single-threaded run's CPU time is its wall time on an idle core.
job() {
    local seed=$1 name=$2 t0=$SECONDS TIMEFORMAT="%U %S"; shift 2
    mkdir -p "$OUT/s$seed"
    if ! { time "$@" > "$OUT/s$seed/$name.log" 2>&1; } 2> "$OUT/s$seed/$name.cpu"; then
        echo "FAILED: s$seed/$name (see $OUT/s$seed/$name.log)"; return 1
    fi
    local cpu; cpu=$(awk '{printf "%.0f", $1 + $2}' "$OUT/s$seed/$name.cpu")
    echo "$name $cpu" >> "$OUT/cpu.txt"
    echo "  s$seed/$name: $(( SECONDS - t0 )) s wall, $cpu s CPU"
}
export -f job
# Each line of stdin is one job's arguments; JOBS at a time; fails if any job fails.
pool() { xargs -P "$JOBS" -L 1 bash -c 'job "$@"' _; }
at() { echo "--seed $1 --out_dir $OUT/s$1/$2 --cache $OUT/cache"; }  # a training run's seed and folders
# A phase's wall time, and its runs' CPU seconds over JOBS: about the wall time on JOBS idle cores.
# Args: NAME START [CPU] (default: the runs finished since the last phase).
phase() {
    local cpu=${3:-}
    if [ -z "$cpu" ]; then
        cpu=$(awk '{c += $2} END {printf "%.0f", c}' "$OUT/cpu.txt"); : > "$OUT/cpu.txt"; total_cpu=$(( total_cpu + cpu ))
    fi
    echo "$1: $(( SECONDS - $2 )) s wall (load average $(cut -d' ' -f1-3 /proc/loadavg)); $cpu s CPU," \
         "~$(( cpu / JOBS )) s on $JOBS idle cores" | tee -a "$OUT/times.txt"
}

start=$SECONDS total_cpu=0
mkdir -p "$OUT"; : > "$OUT/times.txt"; : > "$OUT/cpu.txt"
run python data.py prepare --catalog sample_data/catalog.csv --cache "$OUT/cache"
run python data.py mine-pairs --favourites sample_data/favourites.csv --catalog sample_data/catalog.csv \
    --out "$OUT/cf_pairs.csv" --window $CF_WINDOW --max_pairs_per_user $CF_PER_USER

t=$SECONDS; echo; echo "Stage 1, seeds $SEEDS ($JOBS at a time): $LAUNCH pretrain.py --preset $PRESET --seed S ..."
for s in $SEEDS; do echo "$s stage1 $LAUNCH pretrain.py --preset $PRESET $(at $s stage1)"; done | pool
phase "stage 1 (${SEEDS// /, })" $t

t=$SECONDS; echo; echo "Stage 2: HTCL, HTCL_w/o_text, HTCL_w_CF from each seed's stage-1 artifact, $STAGE2_EPOCHS epochs ($JOBS at a time)"
for s in $SEEDS; do
    init="--preset $PRESET --init_from $OUT/s$s/stage1/final --epochs $STAGE2_EPOCHS"
    echo "$s htcl $LAUNCH finetune.py $init $(at $s htcl)"
    echo "$s htcl_w_cf $LAUNCH finetune.py $init $(at $s htcl_w_cf) --pairs $OUT/cf_pairs.csv"
    echo "$s htcl_wo_text $LAUNCH finetune.py $init $(at $s htcl_wo_text) --no-use_text"
done | pool
phase "stage 2 (9 runs)" $t

t=$SECONDS; echo; echo "Evaluation per seed (evaluate.py report), then over seeds (evaluate.py table2)"
for s in $SEEDS; do
    echo "$s report python evaluate.py report --catalog sample_data/catalog.csv --cache $OUT/cache" \
         "--favourites sample_data/favourites.csv --impressions sample_data/impressions.csv" \
         $(for r in stage1 htcl_w_cf htcl_wo_text htcl; do echo "--emb $OUT/s$s/$r/final"; done) "--emb random" \
         "--out $OUT/s$s/report --workers 1 $EVAL"  # the pool runs $JOBS reports side by side
done | pool
phase "evaluation (3 reports)" $t

echo
run python evaluate.py table2 $(for s in $SEEDS; do echo "$OUT/s$s/report"; done) --out "$OUT"
phase "table2.sh total (runs only in CPU)" $start $total_cpu
echo "Table 2: $OUT/table2.md (numbers: table2.json), Figure 2: $OUT/figure2.png, times: $OUT/times.txt"
