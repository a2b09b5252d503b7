#!/usr/bin/env bash
# A training job that resubmits itself until the run is done.
#
#   sbatch examples/resume_job.sh examples/resume_jax.py --ckpt /scratch/$USER/run1 --steps 100000
#   bash   examples/resume_job.sh examples/resume_torch.py --ckpt /tmp/run1   # without SLURM
#
# The Python program uses remat_kit.resume.PreemptionHandler: on SIGTERM, SIGINT or SIGUSR1 it
# finishes the current step, saves, and exits with code 75 (resume.EXIT_PREEMPTED). This script
# forwards those signals to it and, on 75, submits itself again (SLURM) or restarts (no SLURM);
# the new run calls restore_latest() and continues. Any other exit code ends the chain: 0 is
# done, anything else is a crash to look at (resubmitting a crash would loop forever). After
# Ctrl-C (SIGINT) the job saves and stops without resubmitting.
#
#SBATCH --job-name=remat-resume
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=remat-resume-%x.log
# (--signal=B:USR1@180: SLURM sends SIGUSR1 to this script 180 s before the time limit, enough
#  for a step plus a save; the trap below passes it on to Python.)

set -u
EXIT_PREEMPTED=75
MAX_ATTEMPTS=${MAX_ATTEMPTS:-50}
ATTEMPT=${RESUME_ATTEMPT:-1}

if [ "$#" -lt 1 ]; then
  echo "usage: $0 TRAIN_SCRIPT.py [ARGS...]" >&2
  exit 2
fi

python "$@" &
child=$!
interrupted=0  # Ctrl-C means "stop", not "preempted": never resubmit after it
forward() { kill -s "$1" "$child" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'interrupted=1; forward INT' INT
trap 'forward USR1' USR1

# `wait` returns early when a trapped signal arrives: keep waiting until the child has exited.
while true; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || break
done

if [ "$status" -eq "$EXIT_PREEMPTED" ] && [ "$interrupted" -eq 0 ]; then
  if [ "$ATTEMPT" -ge "$MAX_ATTEMPTS" ]; then
    echo "[resume_job] preempted $ATTEMPT times; MAX_ATTEMPTS=$MAX_ATTEMPTS reached, not resubmitting" >&2
    exit "$status"
  fi
  next=$((ATTEMPT + 1))
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "[resume_job] preempted; submitting attempt $next" >&2
    RESUME_ATTEMPT=$next sbatch --export=ALL "$0" "$@"
    exit 0
  fi
  echo "[resume_job] preempted; restarting (attempt $next)" >&2
  RESUME_ATTEMPT=$next exec "$0" "$@"
fi
exit "$status"
