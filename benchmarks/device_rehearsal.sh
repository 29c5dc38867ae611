#!/usr/bin/env bash
# Rehearse the lent GPU machine's software on the CPU, so that a lease's first minute is not lost to an
# import or an API our development versions have and the device's lack (issue 22).
#
# The device runs Python 3.12 with torch 2.11.0 and torchvision 0.26.0 (CUDA 13.0 builds), transformers
# 5.17, numpy 2.5, no open_clip and no DALI (the device tool's KINDS.md). This builds that environment
# in the git-ignored folder .rehearse/ (about 3 GB, downloaded once; later runs reuse it), installs the
# wheels benchmarks/gpu_wheels.sh prepares exactly as the device README says (--no-index --no-deps
# --target), and runs, on the CPU:
#   benchmarks/gpu_suite.py --cpu-dry-run    every stage of the GPU suite at tiny sizes
#   the gpu-marked tests and the quick tests of what the suite exercises (they skip what needs CUDA)
# One line per stage; a failure exits non-zero naming the stage. DALI is not rehearsed: the suite
# carries it only optionally (gpu_wheels.sh --dali) and reports its stage as skipped without it.
#
#   benchmarks/device_rehearsal.sh          (or: make rehearse)
#   PY312=/path/to/python3.12 benchmarks/device_rehearsal.sh
set -uo pipefail
cd "$(dirname "$0")/.."
R=.rehearse
# .rehearse/ is git-ignored (.gitignore): it never travels to the device
# The device's versions where KINDS.md names them; the others as the registry has them today.
DEVICE_PACKAGES=(
  torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 numpy==2.5.2 safetensors==0.8.0
  tokenizers==0.23.2 huggingface_hub==1.33.0 timm regex pyarrow scikit-learn scikit-image pyyaml tqdm
  pillow pytest tensorboard
)
# The quick tests of the code the suite exercises: model, loss, gates, text trimming, FLOPs, the
# training step and loop (the gpu tests build a Trainer over the torch loader: on the CPU they skip,
# test_train and test_torch_loader run the same code), eval features and metrics, the suite itself.
QUICK_TESTS=(
  tests/test_gpu.py tests/test_gpu_suite.py tests/test_model.py tests/test_loss.py tests/test_text_trim.py
  tests/test_flops.py tests/test_config.py tests/test_optim.py tests/test_eval_metrics.py
  tests/test_eval_linear_probe.py tests/test_import_rules.py tests/test_train.py tests/test_torch_loader.py
  tests/test_loss_sigmoid.py
)

stage() { printf '%-16s %s\n' "$1" "$2"; }
fail() { stage "$1" "FAILED${2:+: $2}"; echo "rehearsal failed at stage: $1" >&2; exit 1; }

# a pyenv shim of an inactive version fails: take pyenv's own 3.12 first, then what PATH has
PY312=${PY312:-$(ls "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)}
PY312=${PY312:-$(command -v python3.12)}
[ -n "$PY312" ] && "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
  || fail python "no Python 3.12 found (set PY312)"
stage python "$("$PY312" --version 2>&1)"

[ -x "$R/venv/bin/python" ] || "$PY312" -m venv "$R/venv" || fail venv
PY="$R/venv/bin/python"
stage venv "$R/venv"

want="${DEVICE_PACKAGES[*]}"
if [ "$(cat "$R/device-packages" 2>/dev/null)" != "$want" ]; then
  # --isolated: this machine's pip config points at a CPU-only torch 2.13 for Python 3.11
  "$PY" -m pip install --isolated -q --progress-bar off "${DEVICE_PACKAGES[@]}" > "$R/pip.log" 2>&1 \
    || fail device-packages "see $R/pip.log"
  echo "$want" > "$R/device-packages"
fi
stage device-packages "torch $("$PY" -c 'import torch; print(torch.__version__)')"

benchmarks/gpu_wheels.sh > "$R/wheels.log" 2>&1 || fail wheels "see $R/wheels.log"
stage wheels "$(ls .whl | tr '\n' ' ')"

rm -rf "$R/site"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$R/site" .whl/*.whl \
  > "$R/carry.log" 2>&1 || fail carry "see $R/carry.log"
export PYTHONPATH="$PWD/$R/site:$PWD"
stage carry "$R/site"

"$PY" - <<'EOF' || fail versions
import sys
import numpy, open_clip, torch, torchvision, transformers
assert torch.__version__.startswith("2.11.0"), torch.__version__
assert torchvision.__version__.startswith("0.26.0"), torchvision.__version__
assert transformers.__version__.startswith("5.17"), transformers.__version__
assert numpy.__version__.startswith("2.5"), numpy.__version__
import os
import alip  # from the working tree, as on the device (PYTHONPATH=site:.)
assert os.path.dirname(alip.__file__) == os.path.join(os.getcwd(), "alip"), alip.__file__
print(f"versions         Python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, numpy {numpy.__version__}, open_clip {open_clip.__version__}")
EOF

"$PY" benchmarks/gpu_suite.py --cpu-dry-run > "$R/dry-run.log" 2>&1 || { tail -30 "$R/dry-run.log"; fail dry-run "see $R/dry-run.log"; }
stage dry-run "$(grep -c . "$R/dry-run.log") lines, table last (see $R/dry-run.log)"

"$PY" -m pytest -q -p no:cacheprovider "${QUICK_TESTS[@]}" > "$R/tests.log" 2>&1 \
  || { tail -30 "$R/tests.log"; fail tests "see $R/tests.log"; }
stage tests "$(tail -1 "$R/tests.log")"
echo "rehearsal passed"
