#!/usr/bin/env bash
# Zero-shot classification on the 11 datasets of the ALIP tables (test splits, CLIP's names and templates).
#   CHECKPOINT=ALIP_YFCC15M_B32.pt DATA=/data/eval scripts/run_zeroshot.sh
#   PROTOCOL=release CHECKPOINT=... DATA=... scripts/run_zeroshot.sh    # the release's protocol (paper's table)
# $DATA/<name>/ holds each dataset in its torchvision layout (python -m alip.eval zeroshot --help lists them).
# PROTOCOL: clip_benchmark (default) or release. DATASETS overrides the list; NPROC (default: number of
# GPUs, at least 1) > 1 launches torchrun. Extra args go to alip.eval.
set -euo pipefail
: "${CHECKPOINT:?set CHECKPOINT to the checkpoint file}"
: "${DATA:?set DATA to the folder holding one sub-folder per dataset}"
MODEL=${MODEL:-ViT-B-32}
OUT=${OUT:-eval_results}
PYTHON=${PYTHON:-python}
PROTOCOL=${PROTOCOL:-clip_benchmark}
DATASETS=${DATASETS:-"cifar10 cifar100 food101 pets flowers sun397 cars dtd caltech101 fgvc_aircraft imagenet1k"}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "${NPROC}" -ge 1 ] || NPROC=1
if [ "${NPROC}" -gt 1 ]; then launch=("${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node "${NPROC}"); else launch=("${PYTHON}"); fi
# shellcheck disable=SC2086  # DATASETS is a word list
"${launch[@]}" -m alip.eval zeroshot --model "${MODEL}" --checkpoint "${CHECKPOINT}" --data "${DATA}" \
  --dataset ${DATASETS} --protocol "${PROTOCOL}" --output "${OUT}/zeroshot-${PROTOCOL}.json" "$@"
