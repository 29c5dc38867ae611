#!/usr/bin/env bash
# Wheels that the lent GPU machine lacks, into the git-ignored folder .whl/ (carry it to the machine).
#
# The machine has Python 3.12 with torch, torchvision, timm, regex, safetensors, numpy, pyarrow,
# scikit-learn, scikit-image and transformers, but not open_clip or ftfy (and its wcwidth), nor
# CLIP_benchmark, nor DALI.
#   benchmarks/gpu_wheels.sh            # open_clip and friends (~4 MB): one call carries them
#   benchmarks/gpu_wheels.sh --dali     # also DALI, split into parts of < 60 MB in .dali/ (not .whl/:
#                                       # .whl travels whole in every call)
# DALI's wheel (~200 MB) is over one call's 64 MiB: carry one part per back-to-back call into a
# folder that survives on the warm machine (carry=[".dali/part-aa"], then mkdir -p /tmp/dali &&
# cp .dali/part-* /tmp/dali/), then on the last
# call: cat /tmp/dali/part-* > /tmp/nvidia_dali.whl && pip install --target /tmp/site ... as below.
#
# On the machine, in every call:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.dali/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
download() {
  python3 -m pip download --isolated --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$1" "${@:2}"
}
mkdir -p .whl
download .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth
# CLIP_benchmark's class names and templates (zero-shot eval reads its JSON files only; make install
# takes it --no-deps too): without it, zero-shot evaluation on the device stops at its first class name
download .whl clip-benchmark==1.6.2
if [ "${1:-}" = "--dali" ]; then
  tmp=$(mktemp -d)
  download "$tmp" nvidia-dali-cuda130==2.4.0
  mkdir -p .dali
  split -b 60m "$tmp"/nvidia_dali*.whl .dali/part-
  rm -rf "$tmp"
fi
ls -la .whl .dali 2>/dev/null || true
