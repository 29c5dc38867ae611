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
# Environment:
#   DATA           training shards (meta JSON, folder or .rec glob)            required
#   NNODES         number of nodes                                              default 1
#   GPUS_PER_NODE  processes (GPUs) per node                                    default 8
#   MASTER_ADDR    rendezvous host (node 0)                                     default 127.0.0.1
#   MASTER_PORT    rendezvous port                                              default 29500
#   RUN_ID         rendezvous id shared by all nodes                            default alip-b32
#   CONFIG         config file                                 default configs/yfcc15m_vitb32_alip.yaml
#   OUTPUT_DIR     run folder (checkpoints, logs, final weights)                default from the config
#   PER_GPU_BATCH  batch per GPU; the global batch is PER_GPU_BATCH * GPUs      default 512
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

GLOBAL_BATCH=$((PER_GPU_BATCH * NNODES * GPUS_PER_NODE))
overrides=("data.train=${DATA}" "train.batch_size=${GLOBAL_BATCH}")
if [[ -n "${OUTPUT_DIR:-}" ]]; then
    overrides+=("output_dir=${OUTPUT_DIR}")
fi

cd "$(dirname "$0")/.."
echo "ALIP: ${NNODES} node(s) x ${GPUS_PER_NODE} GPUs, global batch ${GLOBAL_BATCH}, config ${CONFIG}" >&2
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
