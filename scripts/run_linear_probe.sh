#!/usr/bin/env bash
# Linear probe (CLIP protocol) on the 10 non-ImageNet datasets of the ALIP tables.
#   CHECKPOINT=ALIP_YFCC15M_B32.pt DATA=/data/eval scripts/run_linear_probe.sh
# Features are cached in $CACHE (default eval_results/features) so a rerun only refits the probe.
# FEATURE=pre-projection probes the features before the projection. NPROC > 1 launches torchrun
# (feature extraction is sharded; the L-BFGS fit runs on every rank's GPU, identically).
set -euo pipefail
: "${CHECKPOINT:?set CHECKPOINT to the checkpoint file}"
: "${DATA:?set DATA to the folder holding one sub-folder per dataset}"
MODEL=${MODEL:-ViT-B-32}
OUT=${OUT:-eval_results}
PYTHON=${PYTHON:-python}
FEATURE=${FEATURE:-projected}
CACHE=${CACHE:-${OUT}/features}
DATASETS=${DATASETS:-"cifar10 cifar100 food101 pets flowers sun397 cars dtd caltech101 fgvc_aircraft"}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "${NPROC}" -ge 1 ] || NPROC=1
if [ "${NPROC}" -gt 1 ]; then launch=("${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node "${NPROC}"); else launch=("${PYTHON}"); fi
# shellcheck disable=SC2086  # DATASETS is a word list
"${launch[@]}" -m alip.eval linear-probe --model "${MODEL}" --checkpoint "${CHECKPOINT}" --data "${DATA}" \
  --dataset ${DATASETS} --feature "${FEATURE}" --cache-dir "${CACHE}" --output "${OUT}/linear_probe-${FEATURE}.json" "$@"
