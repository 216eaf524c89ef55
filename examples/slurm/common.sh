# Shared by pretrain.sbatch and finetune.sbatch (sourced, not run): one `python -m mixmim.launch` (torchrun
# with a clean stop) per node under srun, the rendezvous on the allocation's first node, and a clean stop
# before the time limit that requeues the job.
#
# Signals: the job scripts ask SLURM for `--signal=B:USR1@120`, i.e. USR1 to this batch shell (only) 120 s
# before the time limit. The trap below turns it into SIGTERM for the job step: srun forwards it to the
# launcher, which asks every rank (through their stop file) to finish its step and checkpoint; the workers,
# torchrun and the launcher then exit 0. The job is requeued with `scontrol requeue`; the next start passes
# --resume and continues from that checkpoint. A SIGTERM to this shell (scancel, or preemption with a grace
# time) is forwarded the same way but does not requeue: scancel means stop, and preemption with
# PreemptMode=REQUEUE requeues the job by itself (the scripts ask for --requeue). $LAUNCH replaces the
# launcher (e.g. LAUNCH=torchrun, which exits 1 after a SIGTERM however cleanly its workers stopped).

mixmim_rendezvous() {
    # torchrun's multi-node arguments from what SLURM says about the allocation.
    local head
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    echo "--nnodes=${SLURM_JOB_NUM_NODES:-1} --nproc-per-node=${GPUS_PER_NODE} --rdzv-backend=c10d" \
         "--rdzv-endpoint=${head}:${MASTER_PORT:-29500} --rdzv-id=${SLURM_JOB_ID} --max-restarts=0"
}

mixmim_run() {
    # mixmim_run VERB ARGS...: `srun python -m mixmim.launch ... -m mixmim VERB ARGS...` on every node,
    # stopping cleanly (and requeueing) when USR1 comes; returns the step's exit status, or 0 after a requeue.
    local rdzv requeue=0 stopped=0 status=0 step launch
    rdzv=$(mixmim_rendezvous)
    if [ -n "${LAUNCH:-}" ]; then launch=("$LAUNCH"); else launch=("${PYTHON:-python3}" -m mixmim.launch); fi
    trap 'requeue=1; stopped=1; echo "mixmim: time limit near, asking for a checkpoint" >&2; kill -TERM "$step" 2>/dev/null || true' USR1
    trap 'stopped=1; echo "mixmim: SIGTERM, asking for a checkpoint" >&2; kill -TERM "$step" 2>/dev/null || true' TERM
    # shellcheck disable=SC2086  # $rdzv is a list of arguments
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${launch[@]}" $rdzv -m mixmim "$@" &
    step=$!
    # `wait` returns as soon as a trapped signal arrives: wait again until the step has really ended.
    while true; do
        wait "$step" && status=0 || status=$?
        kill -0 "$step" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [ "$requeue" = 1 ]; then
        echo "mixmim: step ended (status $status); requeueing job $SLURM_JOB_ID to continue with --resume" >&2
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    if [ "$stopped" = 1 ]; then
        echo "mixmim: stopped by SIGTERM (step status $status); resume with the same sbatch command" >&2
    fi
    return "$status"
}
