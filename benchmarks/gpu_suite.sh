#!/usr/bin/env bash
# GPU suite (issue 12, item 7): three timed parts on one GPU, under 8 minutes in all (caps below), each
# writing <part>.json + <part>.md into the output folder; suite.json / suite.md summarise them (paste
# suite.md into benchmarks/RESULTS.md). A failing or timed-out part gets a failure record and the next
# part still runs.
#   1. augment_gpu  (cap 70 s)  batched SSL augmentation on the GPU vs the MONAI tutorial chain on the CPU
#                               (goal ≥ 50×) and vs the model step it feeds (benchmarks/gpu_augment.py)
#   2. pretrain_gpu (cap 70 s)  pretraining steps/s of the engine, bf16 vs fp32 (benchmarks/gpu_pretrain.py)
#   3. study_gpu    (cap 335 s) pipelines/label_efficiency_gpu.yaml: medssl sweep (260 s) + medssl compare
#                               (20 s) + benchmarks/label_efficiency.py --report-only (25 s) + summary (30 s)
#
# Usage:
#   bash benchmarks/gpu_suite.sh [--dry-run] [OUTPUT_DIR]      # OUTPUT_DIR default: $OUT
#   GPU_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh OUTPUT_DIR   # the same dry run
# Environment:
#   MEDSSL_DATASETS   folder holding msd_task04_hippocampus/ (default ../shared/datasets beside the repo)
#   PYTHON            interpreter (default: python3); the repo is put first on PYTHONPATH (no install needed)
#   GPU_SUITE_ALLOWED dry run only: distributions the GPU image has (default benchmarks/gpu_image_packages.txt);
#                     importing any other installed one fails, as there (benchmarks/_audit/sitecustomize.py)
#   GPU_SUITE_WORK    work folder: MLflow store (sqlite), study folders, logs. Default OUTPUT_DIR/work, but
#                     ${TMPDIR:-/tmp}/medssl_gpu_suite_work when OUTPUT_DIR comes from $OUT (a device
#                     tool's $OUT returns only a few files: then only the 8 result files are there).
#                     Re-running with the same work folder resumes the study (finished runs are skipped).
# --dry-run (CPU, tiny sizes, about 2 minutes on 2 cores) runs every part end to end; tests/test_gpu_suite.py
# runs it in CI. Exit code: 0 when every part succeeded, else 1 (the results are written either way).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY="${GPU_SUITE_DRY_RUN:-0}"
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_suite: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUTDIR="$arg" ;;
  esac
done
[ "$DRY" = "0" ] || DRY=1
source "$(dirname "${BASH_SOURCE[0]}")/_gpu_dirs.sh"
gpu_dirs gpu_suite "${GPU_SUITE_WORK:-}"
DATASETS="${MEDSSL_DATASETS:-$REPO/../shared/datasets}"
HIPPO="$DATASETS/msd_task04_hippocampus"
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac   # part 3 changes folder
B="$REPO/benchmarks"
PIPE="$REPO/pipelines/label_efficiency_gpu.yaml"
STUDY="hippocampus-label-efficiency-gpu"
export PYTHONPATH="$B/_audit:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export GPU_SUITE_IMPORTS="$WORK/imports"   # benchmarks/_audit/sitecustomize.py: modules each process imported
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
RECORD="$WORK/parts.tsv"
: > "$RECORD"

MEDSSL=("$PY" -c 'from medssl.cli import app; app(prog_name="medssl")')   # `medssl` without an install

# run_step LOG CAP CMD... : CMD under a hard time cap (SIGINT first: Python unwinds, MLflow runs are closed
# as KILLED; SIGKILL 15 s later); sets STEP_RC and STEP_S.
run_step() {
  local log="$1" cap="$2"; shift 2
  local t0; t0=$(date +%s.%N)
  timeout -s INT -k 15 "$cap" "$@" >>"$log" 2>&1
  STEP_RC=$?
  STEP_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
}

# finish_part NAME RC WALL CAP : failure record when the part wrote no JSON, one line in the record.
finish_part() {
  "$PY" "$B/_suite.py" fallback --out "$OUTDIR" --part "$1" --rc "$2" --wall "$3" --cap "$4" \
    --log "$WORK/logs/$1.log" "${DRYFLAG[@]}" >>"$WORK/logs/$1.log" 2>&1
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RECORD"
  echo "[gpu_suite] $1: exit code $2, ${3} s (cap $4 s)$([ "$2" = 124 ] && echo ', TIMED OUT')"
}

if [ "$DRY" = 1 ]; then  # tiny sizes: every part end to end on the CPU in about 2 minutes on 2 cores
  # imports of distributions the GPU image lacks fail here as they would there (GPU_SUITE_ALLOWED= disables)
  export GPU_SUITE_ALLOWED="${GPU_SUITE_ALLOWED-$B/gpu_image_packages.txt}"
  [ -n "$GPU_SUITE_ALLOWED" ] || unset GPU_SUITE_ALLOWED
  CAP1=90; CAP2=90; CAP_SWEEP=240; CAP_CMP=60; CAP_REP=60; CAP_SUM=60; DEV=cpu
  A1=(--device cpu --n-volumes 8 --batch 4 --seconds 0.3 --rounds 1 --pairs simclr:segresnet
      --encoder-kwargs '{"segresnet": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}}')
  A2=(--device cpu --n-volumes 4 --batch 2 --steps 2 --rounds 1 --pairs simclr:segresnet,genesis:unet
      --encoder-kwargs '{"segresnet": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}, "unet": {"features": [8, 8, 16, 16, 32, 8]}}')
  NET='{init_filters: 8, blocks_down: [1, 1], blocks_up: [1]}'
  SETS=(--set pretrain.device=cpu --set pretrain.amp=null --set finetune.device=cpu
        --set "pretrain.encoder_kwargs=$NET" --set "finetune.network_kwargs=$NET"
        --set "pretrain.method_kwargs={hidden_dim: 16, out_dim: 8, temperature: 0.1}"
        --set "pretrain.roi_size=[16, 16, 16]" --set pretrain.batch_size=4 --set pretrain.total_steps=2
        --set pretrain.warmup_steps=0 --set pretrain.checkpoint_every=0
        --set "finetune.roi_size=[16, 16, 16]" --set finetune.batch_size=1 --set finetune.max_steps=2
        --set finetune.warmup_steps=0 --set finetune.sw_overlap=0.0 --set finetune.sw_batch_size=16)
else
  CAP1=70; CAP2=70; CAP_SWEEP=260; CAP_CMP=20; CAP_REP=25; CAP_SUM=30; DEV=cuda
  A1=(); A2=(); SETS=()
fi

T_START=$(date +%s)
echo "[gpu_suite] $(date -u +%FT%TZ) repo $REPO, output $OUTDIR, work $WORK, dry run: $DRY"
echo "[gpu_suite] data: $HIPPO $( [ -d "$HIPPO" ] || echo '(MISSING)')"
"$PY" "$B/_suite.py" env >"$WORK/env.json" 2>"$WORK/logs/env.log" \
  || echo "[gpu_suite] cannot read the machine facts (see $WORK/logs/env.log)"
echo "[gpu_suite] machine: $(cat "$WORK/env.json" 2>/dev/null)"
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | sed 's/^/[gpu_suite] /'

# ---- part 1: batched augmentation on the GPU -------------------------------------------------------------
rm -f "$OUTDIR"/augment_gpu.{json,md}
echo "[gpu_suite] part 1: python benchmarks/gpu_augment.py ${A1[*]}"
run_step "$WORK/logs/augment_gpu.log" "$CAP1" "$PY" "$B/gpu_augment.py" --data "$HIPPO" --out "$OUTDIR" \
  "${A1[@]}" "${DRYFLAG[@]}"
finish_part augment_gpu "$STEP_RC" "$STEP_S" "$CAP1"

# ---- part 2: AMP bf16 pretraining steps -------------------------------------------------------------------
rm -f "$OUTDIR"/pretrain_gpu.{json,md}
echo "[gpu_suite] part 2: python benchmarks/gpu_pretrain.py ${A2[*]}"
run_step "$WORK/logs/pretrain_gpu.log" "$CAP2" "$PY" "$B/gpu_pretrain.py" --data "$HIPPO" --out "$OUTDIR" \
  "${A2[@]}" "${DRYFLAG[@]}"
finish_part pretrain_gpu "$STEP_RC" "$STEP_S" "$CAP2"

# ---- part 3: one seed of the hippocampus study ---------------------------------------------------------------
rm -f "$OUTDIR"/study_gpu.{json,md}
LOG3="$WORK/logs/study_gpu.log"
SDIR="$WORK/study"
mkdir -p "$SDIR"
export MLFLOW_TRACKING_URI="sqlite:///$SDIR/mlruns.db"
STUDY_DATA="$DATASETS"
T3=$(date +%s.%N)
if [ "$DRY" = 1 ]; then  # 14 cases: 3 test, 1–2 validation, about 10 training cases (5 % → 1 case)
  STUDY_DATA="$WORK/dry_data"
  "$PY" "$B/gpu_study.py" subset --src "$HIPPO" --dst "$STUDY_DATA" --n 14 >>"$LOG3" 2>&1
fi
echo "[gpu_suite] part 3: medssl sweep $PIPE ${SETS[*]}"
cd "$SDIR" || exit 1
export MEDSSL_DATASETS="$STUDY_DATA"
run_step "$LOG3" "$CAP_SWEEP" "${MEDSSL[@]}" sweep "$PIPE" "${SETS[@]}"
SW_RC=$STEP_RC SW_S=$STEP_S
echo "[gpu_suite] part 3: medssl compare --study $STUDY (sweep: exit code $SW_RC, $SW_S s)"
run_step "$LOG3" "$CAP_CMP" "${MEDSSL[@]}" compare --study "$STUDY"
CMP_RC=$STEP_RC CMP_S=$STEP_S
REPORT="$SDIR/report.md"
rm -f "$REPORT"
run_step "$REPORT" "$CAP_REP" "$PY" "$B/label_efficiency.py" "$PIPE" --workdir "$SDIR" --report-only --no-figures
REP_RC=$STEP_RC REP_S=$STEP_S
if [ "$REP_RC" != 0 ]; then cat "$REPORT" >>"$LOG3"; rm -f "$REPORT"; fi
run_step "$LOG3" "$CAP_SUM" "$PY" "$B/gpu_study.py" summarise --study "$STUDY" --tracking-uri "$MLFLOW_TRACKING_URI" \
  --out "$OUTDIR" --pipeline pipelines/label_efficiency_gpu.yaml --report "$REPORT" --device "$DEV" \
  --step sweep "$SW_RC" "$SW_S" --step compare "$CMP_RC" "$CMP_S" --step report "$REP_RC" "$REP_S" "${DRYFLAG[@]}"
SUM_RC=$STEP_RC
cd "$REPO" || exit 1
RC3=$SUM_RC
for r in "$SW_RC" "$CMP_RC"; do [ "$r" = 0 ] || RC3=$r; done
W3=$(awk -v a="$T3" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
finish_part study_gpu "$RC3" "$W3" "$((CAP_SWEEP + CAP_CMP + CAP_REP + CAP_SUM))"

# ---- summary ----------------------------------------------------------------------------------------------
"$PY" "$B/_suite.py" summary --out "$OUTDIR" --record "$RECORD" --env "$WORK/env.json" "${DRYFLAG[@]}" \
  || echo "[gpu_suite] summary failed"
echo "[gpu_suite] total wall $(( $(date +%s) - T_START )) s; results: $OUTDIR/suite.md (logs: $WORK/logs)"
cut -f1,2 "$RECORD" | grep -qv $'\t0$' && exit 1
exit 0
