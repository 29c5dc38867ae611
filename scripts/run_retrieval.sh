#!/usr/bin/env bash
# Zero-shot retrieval on MSCOCO 5k and Flickr30k 1k (Karpathy test splits).
#   CHECKPOINT=ALIP_YFCC15M_B32.pt COCO=/data/coco FLICKR=/data/flickr30k scripts/run_retrieval.sh
#   PROTOCOL=release CHECKPOINT=... COCO=... scripts/run_retrieval.sh    # the release's protocol (paper's table)
# COCO: $COCO/dataset_coco.json + $COCO/val2014/*.jpg; Flickr: $FLICKR/dataset_flickr30k.json + $FLICKR/*.jpg.
# COCO_ANN / FLICKR_ANN override the annotation files, e.g. ALBEF's coco_test.json / flickr30k_test.json
# (the files the release reads; same images and captions). PROTOCOL: clip_benchmark (default) or release.
# NPROC (default: number of GPUs, at least 1) > 1 launches torchrun on this node. Extra args go to alip.eval.
set -euo pipefail
: "${CHECKPOINT:?set CHECKPOINT to the checkpoint file}"
MODEL=${MODEL:-ViT-B-32}
OUT=${OUT:-eval_results}
PYTHON=${PYTHON:-python}
PROTOCOL=${PROTOCOL:-clip_benchmark}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "${NPROC}" -ge 1 ] || NPROC=1
if [ "${NPROC}" -gt 1 ]; then launch=("${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node "${NPROC}"); else launch=("${PYTHON}"); fi
if [ -n "${COCO:-}" ]; then
  "${launch[@]}" -m alip.eval retrieval --model "${MODEL}" --checkpoint "${CHECKPOINT}" --dataset coco \
    --annotations "${COCO_ANN:-${COCO}/dataset_coco.json}" --images "${COCO}" --protocol "${PROTOCOL}" \
    --output "${OUT}/retrieval-coco-${PROTOCOL}.json" "$@"
fi
if [ -n "${FLICKR:-}" ]; then
  "${launch[@]}" -m alip.eval retrieval --model "${MODEL}" --checkpoint "${CHECKPOINT}" --dataset flickr30k \
    --annotations "${FLICKR_ANN:-${FLICKR}/dataset_flickr30k.json}" --images "${FLICKR}" --protocol "${PROTOCOL}" \
    --output "${OUT}/retrieval-flickr30k-${PROTOCOL}.json" "$@"
fi
[ -n "${COCO:-}${FLICKR:-}" ] || { echo "set COCO and/or FLICKR to the dataset folders" >&2; exit 2; }
