#!/usr/bin/env bash
# medssl vs nnU-Net v2 at equal GPU minutes (issue 12, item 2), for one device call: hippocampus, one (fraction,
# seed) of the study's splits (default 10 %, seed 0), M minutes of training for each arm (default 3), one after
# the other on the same GPU, each under a hard cap. Estimated (not run yet) with the wheel install before it:
# about 500 s at M = 2.5 and 560 s at M = 3, of a device call's 600 s: use --minutes 2.5 for a single call.
#   0. facts        machine facts; the study's datalist moved onto $MEDSSL_DATASETS/msd_task04_hippocampus
#   1. medssl_time  (cap 150 s)       s/step + validation s of pipelines/recipe_check.yaml's finetune recipe
#                                     (benchmarks/finetune_step_time.py) → the max_steps that fill M minutes
#   2. medssl       (cap M·60 + 150)  medssl finetune: that recipe from scratch, finetune.device=cuda, no MLflow
#   3. nnunet       (cap M·60 + 300)  benchmarks/peer_nnunet.py --device cuda --minutes M --batch planner
#                                     --n-proc-da 8 (plan, probe, train, predict with TTA, evaluate)
#   4. nnunet_maxit (--max-iter)      the same with --batch max-iter; skipped where the planner's batch is 2
#                                     already (hippocampus 10 %), as the run would be the same
# Every arm's test Dice (mean and per class, HD95, missed classes) lands in OUTPUT_DIR/gpu_peer.{json,md} (written
# after each arm, so a cut-off call still returns the finished ones), with the machine, versions, budgets and each
# step's exit code and wall time; OUTPUT_DIR/logs.tgz holds the logs and both arms' result files.
#
# Usage:
#   bash benchmarks/gpu_peer.sh --stage DIR [--study-data S] [--fraction F] [--seed N]   # here, before the call
#   bash benchmarks/gpu_peer.sh [--dry-run] [--minutes M] [--fraction F] [--seed N] [--study-data S] [--max-iter]
#                               [OUTPUT_DIR]                                            # OUTPUT_DIR default: $OUT
# --stage DIR copies what the GPU machine needs of the study into DIR (DIR/study: datalist, splits, manifest;
# DIR/msd_task04_hippocampus: the run's 74 cases at 10 % and header-only stubs of the 126 others medssl's planner
# reads the shapes of: 5.3 MiB), then exits; run there with MEDSSL_DATASETS=DIR and --study-data DIR/study.
# Device call (make gpu-wheels and --stage .gpu/peer first; carry .gpu/whl/core .gpu/whl/nnunet .gpu/peer, 60 MiB
# with the working tree; timeout_s 600):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .gpu/whl/core/*.whl .gpu/whl/nnunet/*.whl || exit 9; export PYTHONPATH=/tmp/site;
#   MEDSSL_DATASETS=$PWD/.gpu/peer NNUNET_DIR=/tmp/site bash benchmarks/gpu_peer.sh --study-data .gpu/peer/study "$OUT"
# Environment:
#   MEDSSL_DATASETS  folder holding msd_task04_hippocampus/ (default ../shared/datasets beside the repo)
#   PYTHON           medssl's interpreter (default python3); the repo is put first on PYTHONPATH (no install needed)
#   NNUNET_DIR       nnU-Net: a venv or a `pip install --target` folder on PYTHONPATH (default .venv-nnunet)
#   GPU_PEER_WORK    work folder (default OUTPUT_DIR/work; ${TMPDIR:-/tmp}/medssl_gpu_peer_work when OUTPUT_DIR
#                    comes from $OUT). A finished arm in it is not run again.
# --dry-run: the same steps on the CPU with tiny budgets (3 timed steps, 2 medssl steps, an nnU-Net probe of 3
# iterations and a few seconds' budget); imports of distributions neither on the GPU image nor carried to it
# ([core] + [nnunet] of benchmarks/gpu_wheels.txt) fail as they would there (benchmarks/_audit/sitecustomize.py).
# tests/test_gpu_peer.py runs it. Exit code: 0 when every step succeeded, else 1 (the report is written either way).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
B="$REPO/benchmarks"
DRY="${GPU_PEER_DRY_RUN:-0}" STAGE="" MIN="" FRACTION=10 SEED=0 MAXIT=0 OUTDIR=""
STUDY_SRC="$REPO/studies/runs/sweeps/hippocampus-label-efficiency/data"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --max-iter) MAXIT=1 ;;
    --stage|--minutes|--fraction|--seed|--study-data)
      [ $# -ge 2 ] || { echo "gpu_peer: $1 needs a value" >&2; exit 2; }
      case "$1" in
        --stage) STAGE="$2" ;; --minutes) MIN="$2" ;; --fraction) FRACTION="$2" ;; --seed) SEED="$2" ;;
        --study-data) STUDY_SRC="$2" ;;
      esac
      shift ;;
    -h|--help) sed -n '2,39p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_peer: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUTDIR="$1" ;;
  esac
  shift
done
[ "$DRY" = "0" ] || DRY=1
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [ -n "$STAGE" ]; then
  exec "$PY" "$B/_gpu_peer.py" stage --study-data "$STUDY_SRC" --fraction "$FRACTION" --seed "$SEED" \
    --dst "$STAGE"
fi

source "$(dirname "${BASH_SOURCE[0]}")/_gpu_dirs.sh"
gpu_dirs gpu_peer "${GPU_PEER_WORK:-}"
DATASETS="${MEDSSL_DATASETS:-$REPO/../shared/datasets}"
HIPPO="$DATASETS/msd_task04_hippocampus"
[ -d "$HIPPO" ] && HIPPO="$(cd "$HIPPO" && pwd)"
NNUNET="${NNUNET_DIR:-$REPO/.venv-nnunet}"
PIPE="$REPO/pipelines/recipe_check.yaml"
MEDSSL=("$PY" -c 'from medssl.cli import app; app(prog_name="medssl")')   # `medssl` without an install

if [ "$DRY" = 1 ]; then  # tiny budgets on the CPU; only the GPU image's + the carried distributions importable
  MIN="${MIN:-0.05}" DEV=cpu TIME_STEPS=3 MEDSSL_STEPS=(--steps 2) NPDA=0 PROBE=(--probe-warmup 1 --probe-iterations 2)
  CAP_TIME=400 CAP_MEDSSL=600 CAP_NNUNET=1500 DEADLINE=0
  ALLOWED="$WORK/allowed_packages.txt"
  awk '/^# carried as wheels/ { exit } { print }' "$B/gpu_image_packages.txt" >"$ALLOWED"
  awk '/^\[/ { g = $1 } { sub(/#.*/, "") } (g == "[core]" || g == "[nnunet]") && /==/ { sub(/==.*/, ""); print $1 }' \
    "$B/gpu_wheels.txt" >>"$ALLOWED"
  echo medssl >>"$ALLOWED"
  export GPU_SUITE_ALLOWED="$ALLOWED" PYTHONPATH="$B/_audit:$PYTHONPATH"
else
  MIN="${MIN:-3}" DEV=cuda TIME_STEPS=40 MEDSSL_STEPS=() NPDA=8 PROBE=(--probe-warmup 10 --probe-iterations 30)
  CAP_TIME=150 CAP_MEDSSL=$(awk -v m="$MIN" 'BEGIN { printf "%d", m * 60 + 150 }')
  CAP_NNUNET=$(awk -v m="$MIN" 'BEGIN { printf "%d", m * 60 + 300 }')
  DEADLINE="${GPU_PEER_DEADLINE:-540}"   # s after this start: a device call's limit is 600 s, the install ~30 s
fi
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
RECORD="$WORK/steps.tsv"
: >"$RECORD"
T_START=$(date +%s)

# run_step NAME CAP CMD... : CMD under a hard time cap (SIGINT first, SIGKILL 15 s later; the cap shrinks to what
# is left before DEADLINE), output to logs/NAME.log, one line in the record; sets STEP_RC and STEP_S.
run_step() {
  local name="$1" cap="$2"; shift 2
  if [ "$DEADLINE" -gt 0 ]; then
    local left=$((DEADLINE - ($(date +%s) - T_START)))
    [ "$left" -lt "$cap" ] && cap=$((left > 1 ? left : 1))
  fi
  echo "[gpu_peer] $name (cap $cap s): $*"
  local t0; t0=$(date +%s.%N)
  timeout -s INT -k 15 "$cap" "$@" >>"$WORK/logs/$name.log" 2>&1
  STEP_RC=$?
  STEP_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$STEP_RC" "$STEP_S" "$cap" >>"$RECORD"
  echo "[gpu_peer] $name: exit code $STEP_RC, $STEP_S s$([ "$STEP_RC" = 124 ] && echo ', TIMED OUT')"
  [ "$STEP_RC" = 0 ] || tail -n 5 "$WORK/logs/$name.log" | sed "s/^/[gpu_peer]   /"
}

# report: gpu_peer.{json,md} + logs.tgz in the output folder (after each arm: a cut-off call keeps what finished)
report() {
  "$PY" "$B/_gpu_peer.py" report --work "$WORK" --out "$OUTDIR" --minutes "$MIN" "${DRYFLAG[@]}" \
    >>"$WORK/logs/report.log" 2>&1 || echo "[gpu_peer] report failed (see $WORK/logs/report.log)"
  (cd "$WORK" && tar czf "$OUTDIR/logs.tgz" logs steps.tsv env.json medssl_config.* medssl/results.json \
    medssl/config.yaml peer/*/result.json 2>/dev/null)
}

echo "[gpu_peer] $(date -u +%FT%TZ) repo $REPO, output $OUTDIR, work $WORK, dry run: $DRY, $MIN min per arm"
echo "[gpu_peer] data: $HIPPO $([ -d "$HIPPO" ] || echo '(MISSING)'), study $STUDY_SRC, nnU-Net $NNUNET"
"$PY" "$B/_suite.py" env >"$WORK/env.json" 2>"$WORK/logs/env.log" || echo "[gpu_peer] no machine facts (logs/env.log)"
echo "[gpu_peer] machine: $(cat "$WORK/env.json" 2>/dev/null)"
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | sed 's/^/[gpu_peer] /'
STUDY="$WORK/study"
run_step relocate 60 "$PY" "$B/_gpu_peer.py" relocate --study-data "$STUDY_SRC" --dataset "$HIPPO" --dst "$STUDY"
RUN=(--fraction "$FRACTION" --seed "$SEED")

# ---- medssl: time the recipe's step, then train for the steps that fill M minutes --------------------------------
if [ -f "$WORK/medssl/results.json" ]; then
  echo "[gpu_peer] medssl: finished before ($WORK/medssl/results.json), not run again"
else
  # finetune_step_time.py splits every image of its folder: only the labelled cases (not the planner's header stubs)
  TIMED="$WORK/timed/msd_task04_hippocampus"
  rm -rf "$WORK/timed" && mkdir -p "$TIMED/imagesTr" "$TIMED/labelsTr" && cp "$HIPPO/dataset.json" "$TIMED/"
  for label in "$HIPPO"/labelsTr/*.nii.gz; do
    ln -s "$label" "$TIMED/labelsTr/" && ln -s "$HIPPO/imagesTr/$(basename "$label")" "$TIMED/imagesTr/"
  done
  run_step medssl_time "$CAP_TIME" bash -c '"$@" >"'"$WORK"'/medssl_timing.json"' _ \
    "$PY" "$B/finetune_step_time.py" "$PIPE" --dataset "$TIMED" --steps "$TIME_STEPS" --minutes "$MIN"
  run_step medssl_config 120 "$PY" "$B/_gpu_peer.py" medssl-config --pipeline "$PIPE" \
    --timing "$WORK/medssl_timing.json" --timing-dataset "$TIMED" --study-data "$STUDY" "${RUN[@]}" \
    --minutes "$MIN" "${MEDSSL_STEPS[@]}" --dst "$WORK/medssl_config.yaml"
  rm -rf "$WORK/medssl"
  run_step medssl "$CAP_MEDSSL" "${MEDSSL[@]}" finetune -c "$WORK/medssl_config.yaml" \
    --datalist "$STUDY/datalist.json" --splits "$STUDY/splits.json" "${RUN[@]}" --init scratch --device "$DEV" \
    --out "$WORK/medssl" --set experiment=null
  echo "$STEP_S" >"$WORK/medssl_train_s.txt"
fi
report

# ---- nnU-Net v2: the same cases, the same minutes ------------------------------------------------------------------
PEER=("$PY" "$B/peer_nnunet.py" --study-data "$STUDY" "${RUN[@]}" --minutes "$MIN" --workdir "$WORK/peer"
      --nnunet-venv "$NNUNET" --device "$DEV" --n-proc-da "$NPDA" "${PROBE[@]}")
run_step nnunet "$CAP_NNUNET" "${PEER[@]}" --batch planner
report
if [ "$MAXIT" = 1 ]; then
  PLANNER_BATCH=$("$PY" -c 'import json, sys, glob; print(json.load(open(sorted(glob.glob(sys.argv[1]))[0]))["planner_batch"])' \
    "$WORK/peer/*/result.json" 2>/dev/null)
  if [ "$PLANNER_BATCH" = 2 ]; then
    echo "[gpu_peer] nnunet_maxit: skipped, the planner's batch is 2 = max-iter (the same run)"
  else
    run_step nnunet_maxit "$CAP_NNUNET" "${PEER[@]}" --batch max-iter
    report
  fi
fi

echo "[gpu_peer] total wall $(($(date +%s) - T_START)) s; results: $OUTDIR/gpu_peer.md"
cat "$OUTDIR/gpu_peer.md" 2>/dev/null
cut -f2 "$RECORD" | grep -qv '^0$' && exit 1
exit 0
