#!/usr/bin/env bash
# Sourced by docker/slurm/*.sbatch: torchrun from SLURM variables, preemption signal forwarding and requeue.
#
#   medssl_torchrun SUBCOMMAND [ARGS...]   one torchrun per node (srun), NPROC processes per node
#   medssl_preemptible SIGNAL CMD [ARGS...] run CMD in the background; on SIGUSR1/SIGTERM to this batch shell
#                                           (SLURM's --signal=B:USR1@T, scancel --signal=USR1 --batch) send
#                                           SIGNAL to CMD (SIGNAL "steps": SIGTERM to every job step via
#                                           scancel), wait for it, then requeue the job
#   medssl_move_dependents OLD NEW          this user's pending jobs waiting on job OLD wait on NEW instead
#
# medssl traps SIGUSR1 and SIGTERM, checkpoints at the next step and exits 75 (medssl/engines/runtime/preemption.py);
# srun steps (torchrun and its workers) get SIGTERM from slurmstepd (scancel --signal=TERM JOBID). The requeued job runs
# the script again with --resume auto (same job id: dependencies on it stay valid). Where requeue is not allowed
# (JobRequeue=0 and no --requeue, or sbatch --no-requeue), the script resubmits itself (MEDSSL_SBATCH_SCRIPT +
# MEDSSL_SBATCH_ARGS, set by the template; an array task as --array=<its index>): a new job id, options given on
# the sbatch command line are not carried (put them in the script), and the stopped job ends with exit 75 (state
# FAILED). Before it ends, every pending job of this user that waits on it (afterok/afterany/... on the job, or on
# <array>_<task> for an array task; a dependent array as a whole) is moved to the new id (medssl_move_dependents):
# a sweep's finetuning array waits for the resubmitted pretraining instead of sitting in DependencyNeverSatisfied.
# The new job does the same when it is preempted in turn, so any number of resubmissions in a row keeps the chain.
#
# Environment: MEDSSL_PYTHON (python with medssl; default python3), MEDSSL_IMAGE (an Apptainer image: each
# command runs inside it with --nv), MEDSSL_NPROC_PER_NODE (default: GPUs on the node, else 1),
# MASTER_PORT (default 29500 + job id % 1000), MEDSSL_DEVICE_ARGS (extra torchrun args).

MEDSSL_PREEMPTED=0

medssl_exec() {  # replace this (sub)shell by the command, inside the image when MEDSSL_IMAGE is set
  if [ -n "${MEDSSL_IMAGE:-}" ]; then exec apptainer exec --nv "$MEDSSL_IMAGE" "$@"; else exec "$@"; fi
}

medssl_preemptible() {
  local fwd=$1 rc=0 pid job=${SLURM_JOB_ID:-}
  shift
  # an array task by <array>_<task>: the task that kept the array's record has SLURM_JOB_ID = the array id, and
  # scancel / scontrol requeue of the array id would reach every task of the array (finished and running ones)
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  "$@" &
  pid=$!
  local send="kill -$fwd $pid"
  # srun ends a step at once on SIGTERM: job steps get the signal through slurmstepd instead (every process
  # of each step: torchrun and its workers; torchrun then waits up to 30 s for the workers' checkpoint)
  [ "$fwd" = "steps" ] && send="scancel --signal=TERM ${job:-0}"
  # shellcheck disable=SC2064  # expand $send now
  trap "MEDSSL_PREEMPTED=1; echo \"medssl: preemption signal at \$(date +%FT%T): $send\"; $send 2>/dev/null" USR1 TERM
  while :; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # a trapped signal interrupts wait: the child still runs
  done
  trap - USR1 TERM
  if [ "$rc" -eq 75 ] || { [ "$MEDSSL_PREEMPTED" = 1 ] && [ "$rc" -ne 0 ]; }; then
    echo "medssl: stopped for preemption (exit $rc, restart ${SLURM_RESTART_COUNT:-0}); requeueing ${job:-?}"
    if [ -n "$job" ] && scontrol requeue "$job"; then
      sleep 60  # slurmctld ends this job now; the requeued one starts from the top with --resume auto
    elif [ -n "${MEDSSL_SBATCH_SCRIPT:-}" ]; then
      # requeue not allowed: resubmit; an array task resubmits only itself (the script's --array would rerun
      # every task, a running one twice into the same folder)
      local only=() new
      [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && only=(--array="$SLURM_ARRAY_TASK_ID")
      if new=$(sbatch --parsable "${only[@]}" "$MEDSSL_SBATCH_SCRIPT" "${MEDSSL_SBATCH_ARGS[@]}"); then
        new=${new%%;*}  # "<id>[;<cluster>]"
        echo "Submitted batch job $new"
        # the new job of an array task is <new>_<task>
        [ -n "$job" ] && medssl_move_dependents "$job" "$new${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"
      fi
    fi
  fi
  return "$rc"
}

medssl_move_dependents() {  # OLD NEW: this user's pending jobs that wait on job OLD wait on NEW instead
  local old=$1 new=$2 id dep moved prev
  # %F: the array job id (a job's own id otherwise): a pending array is one record, and scontrol update of the
  # array id reaches every task of it. %E: "afterok:12(unfulfilled),afterany:13_4(unfulfilled)" ("?" = OR)
  while IFS='|' read -r id dep; do
    dep=$(sed -E 's/\([^)]*\)//g' <<<"$dep")  # drop the "(unfulfilled)" annotations: the Dependency= syntax
    moved=$dep
    while :; do  # a list may name OLD twice in a row (":OLD:OLD"): the delimiter after a match is consumed
      prev=$moved
      moved=$(sed -E "s/:${old}([:,?+]|\$)/:${new}\1/g" <<<"$moved")
      [ "$moved" = "$prev" ] && break
    done
    [ "$moved" = "$dep" ] && continue
    if scontrol update JobId="$id" Dependency="$moved"; then
      echo "medssl: job $id now waits on $new instead of $old (Dependency=$moved)"
    else
      echo "medssl: could not move the dependency of job $id from $old to $new (it waits on $dep)" >&2
    fi
  done < <(squeue -h -t PD -u "$(id -un)" -o "%F|%E" 2>/dev/null | sort -u)
}

medssl_torchrun() {
  local nproc=${MEDSSL_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  MASTER_PORT=${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
  export MASTER_ADDR MASTER_PORT
  # one torchrun per node (srun, 1 task per node); c10d rendezvous on the first node of the allocation
  # shellcheck disable=SC2086  # MEDSSL_DEVICE_ARGS is a list of words
  medssl_preemptible steps srun --kill-on-bad-exit=1 --ntasks-per-node=1 --nodes="${SLURM_NNODES:-1}" \
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" bash -c 'source "$0"; medssl_exec "$@"' "${BASH_SOURCE[0]}" \
    "${MEDSSL_PYTHON:-python3}" -m torch.distributed.run --nnodes="${SLURM_NNODES:-1}" --nproc-per-node="$nproc" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${SLURM_JOB_ID:-0}" \
    ${MEDSSL_DEVICE_ARGS:-} -m medssl.cli "$@"
}
