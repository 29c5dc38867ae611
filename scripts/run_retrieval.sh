#!/usr/bin/env bash
# Zero-shot retrieval on MSCOCO 5k and Flickr30k 1k (Karpathy test splits).
#   CHECKPOINT=ALIP_YFCC15M_B32.pt COCO=/data/coco FLICKR=/data/flickr30k scripts/run_retrieval.sh
# COCO: $COCO/dataset_coco.json + $COCO/val2014/*.jpg; Flickr: $FLICKR/dataset_flickr30k.json + $FLICKR/*.jpg.
# NPROC (default: number of GPUs, at least 1) > 1 launches torchrun on this node. Extra args go to alip.eval.
set -euo pipefail
: "${CHECKPOINT:?set CHECKPOINT to the checkpoint file}"
MODEL=${MODEL:-ViT-B-32}
OUT=${OUT:-eval_results}
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "${NPROC}" -ge 1 ] || NPROC=1
if [ "${NPROC}" -gt 1 ]; then launch=("${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node "${NPROC}"); else launch=("${PYTHON}"); fi
if [ -n "${COCO:-}" ]; then
  "${launch[@]}" -m alip.eval retrieval --model "${MODEL}" --checkpoint "${CHECKPOINT}" --dataset coco \
    --annotations "${COCO}/dataset_coco.json" --images "${COCO}" --output "${OUT}/retrieval-coco.json" "$@"
fi
if [ -n "${FLICKR:-}" ]; then
  "${launch[@]}" -m alip.eval retrieval --model "${MODEL}" --checkpoint "${CHECKPOINT}" --dataset flickr30k \
    --annotations "${FLICKR}/dataset_flickr30k.json" --images "${FLICKR}" --output "${OUT}/retrieval-flickr30k.json" "$@"
fi
[ -n "${COCO:-}${FLICKR:-}" ] || { echo "set COCO and/or FLICKR to the dataset folders" >&2; exit 2; }
