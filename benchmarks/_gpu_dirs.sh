# Sourced by benchmarks/gpu_suite.sh and benchmarks/gpu_peer.sh: the output and work folders of a device call.
# gpu_dirs NAME WORK_OVERRIDE: OUTDIR = $OUTDIR (the script's argument) or $OUT (the device tool's folder);
# WORK = WORK_OVERRIDE, else ${TMPDIR:-/tmp}/medssl_NAME_work when OUTDIR came from $OUT (a device call returns only
# a few files from $OUT), else $OUTDIR/work; both made absolute, $WORK/logs created. Exits 2 without an output folder.
gpu_dirs() {
  local name=$1 override=$2 from_out=0
  if [ -z "$OUTDIR" ]; then OUTDIR="${OUT:-}"; from_out=1; fi
  if [ -z "$OUTDIR" ]; then
    echo "$name: give an output folder (argument) or set \$OUT" >&2; exit 2
  fi
  mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)"
  if [ -n "$override" ]; then WORK="$override"
  elif [ "$from_out" = 1 ]; then WORK="${TMPDIR:-/tmp}/medssl_${name}_work"
  else WORK="$OUTDIR/work"; fi
  mkdir -p "$WORK/logs" && WORK="$(cd "$WORK" && pwd)"
}
