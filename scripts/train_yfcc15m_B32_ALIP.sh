#!/usr/bin/env bash
# Train ALIP ViT-B/32 on YFCC15M with torchrun (our default recipe: configs/yfcc15m_vitb32_alip.yaml;
# the official release's, exactly: CONFIG=configs/yfcc15m_vitb32_alip_release.yaml).
#
# Single node, 8 GPUs:
#   DATA=/data/yfcc15m_rec/train.meta.json scripts/train_yfcc15m_B32_ALIP.sh
# Two nodes (run on each node, same MASTER_ADDR/MASTER_PORT; NODE_RANK is only needed without rendezvous):
#   NNODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node0 MASTER_PORT=29500 DATA=... scripts/train_yfcc15m_B32_ALIP.sh
# Extra arguments are config overrides or --resume, e.g.  optim.lr=5e-4  --resume latest
#
# The global batch (train.batch_size): GLOBAL_BATCH if set; else, with --resume, the run's own
# (train.batch_size in the run folder's config.yaml, once the run has a checkpoint), since a resume
# keeps the checkpoint's global batch and refuses another; else PER_GPU_BATCH x the GPUs. So a run
# checkpointed on 8 nodes continues on 4 with the same global batch (each GPU takes twice its share):
#   NNODES=4 OUTPUT_DIR=runs/b32 DATA=... scripts/train_yfcc15m_B32_ALIP.sh --resume latest --reshard
# (--reshard: another number of GPUs; README, Resume). A train.batch_size=... argument overrides all of these.
#
# Environment:
#   DATA           training shards (meta JSON, folder or .rec glob)            required
#   NNODES         number of nodes                                              default 1
#   GPUS_PER_NODE  processes (GPUs) per node                                    default 8
#   MASTER_ADDR    rendezvous host (node 0)                                     default 127.0.0.1
#   MASTER_PORT    rendezvous port                                              default 29500
#   RUN_ID         rendezvous id shared by all nodes                            default alip-b32
#   CONFIG         config file                                 default configs/yfcc15m_vitb32_alip.yaml
#   OUTPUT_DIR     run folder (checkpoints, logs, final weights)                default from the config
#   GLOBAL_BATCH   global batch (train.batch_size); takes precedence over PER_GPU_BATCH   default: below
#   PER_GPU_BATCH  batch per GPU of a new run: global batch PER_GPU_BATCH * NNODES * GPUS_PER_NODE  default 512
#   MAX_RESTARTS   torchrun restarts after a failure (each resumes from the last checkpoint)  default 3
set -euo pipefail

: "${DATA:?set DATA to the training shards (meta JSON, folder or .rec glob)}"
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ID=${RUN_ID:-alip-b32}
CONFIG=${CONFIG:-configs/yfcc15m_vitb32_alip.yaml}
PER_GPU_BATCH=${PER_GPU_BATCH:-512}
MAX_RESTARTS=${MAX_RESTARTS:-3}

GPUS=$((NNODES * GPUS_PER_NODE))

cd "$(dirname "$0")/.."

# The run folder: OUTPUT_DIR, else the last output_dir=... argument, else the config's output_dir.
run_dir() {
    if [[ -n "${OUTPUT_DIR:-}" ]]; then
        echo "${OUTPUT_DIR}"
        return
    fi
    local arg dir=""
    for arg in "$@"; do
        [[ "${arg}" == output_dir=* ]] && dir=${arg#output_dir=}
    done
    if [[ -z "${dir}" ]]; then
        dir=$(python -c 'import sys, yaml; print((yaml.safe_load(open(sys.argv[1])) or {}).get("output_dir") or "")' \
            "${CONFIG}" 2>/dev/null) || dir=""
    fi
    echo "${dir}"
}

# train.batch_size in the run folder's config.yaml (what the run trains with), where it has a checkpoint.
run_batch() {
    local dir
    dir=$(run_dir "$@")
    [[ -n "${dir}" && -f "${dir}/config.yaml" ]] || return 0
    compgen -G "${dir}/checkpoints/step-*.pt" >/dev/null || return 0
    python -c 'import sys, yaml; print(int(yaml.safe_load(open(sys.argv[1]))["train"]["batch_size"]))' \
        "${dir}/config.yaml" 2>/dev/null || true
}

resuming=0
for arg in "$@"; do
    [[ "${arg}" == --resume || "${arg}" == --resume=* ]] && resuming=1
done
if [[ -n "${GLOBAL_BATCH:-}" ]]; then
    from="GLOBAL_BATCH"
elif [[ ${resuming} == 1 && -n "$(run_batch "$@")" ]]; then
    GLOBAL_BATCH=$(run_batch "$@")
    from="kept from the run: $(run_dir "$@")/config.yaml"
else
    GLOBAL_BATCH=$((PER_GPU_BATCH * GPUS))
    from="PER_GPU_BATCH ${PER_GPU_BATCH} x ${GPUS} GPUs"
fi
if ((GLOBAL_BATCH % GPUS != 0)); then
    echo "ALIP: note: the global batch ${GLOBAL_BATCH} does not split evenly over ${GPUS} GPUs (the trainer refuses it)" >&2
fi

overrides=("data.train=${DATA}" "train.batch_size=${GLOBAL_BATCH}")
if [[ -n "${OUTPUT_DIR:-}" ]]; then
    overrides+=("output_dir=${OUTPUT_DIR}")
fi

echo "ALIP: ${NNODES} node(s) x ${GPUS_PER_NODE} GPUs, global batch ${GLOBAL_BATCH} (${from}; $((GLOBAL_BATCH / GPUS)) per GPU), config ${CONFIG}" >&2
# c10d rendezvous: nodes may start in any order, and a restarted worker group resumes by itself
# (TORCHELASTIC_RESTART_COUNT > 0 makes the trainer load the latest complete checkpoint).
exec torchrun \
    --nnodes "${NNODES}" \
    --nproc-per-node "${GPUS_PER_NODE}" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
    --rdzv-id "${RUN_ID}" \
    --max-restarts "${MAX_RESTARTS}" \
    -m alip.train "${CONFIG}" "${overrides[@]}" "$@"
