#!/usr/bin/env bash
# The fast engine's GPU checks and measurements, as one script (a few minutes on one H200-class GPU).
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # on a machine with CUDA; results under OUT_DIR (default gpu-results)
#   DEVICE=cpu bash benchmarks/gpu.sh /tmp/x  # the same steps as a CPU smoke test of the script (quick shapes)
#
# 1. the GPU tests: the accelerator fold's layer loop never synchronises (torch's sync debug mode),
#    bfloat16 folds agree with the reference engine;
# 2. one folded layer call's attention four ways (dense mask, merged explicit, merged fused, FlexAttention)
#    at the 7B and NeXT head shapes;
# 3. the paper's procedure against vlmflow at the full 7B, NeXT-8B and 13B shapes (random bfloat16 weights),
#    batch 1 and the automatic batch size, with the GQA grid projected in GPU-hours.
set -euo pipefail
out="${1:-gpu-results}"
device="${DEVICE:-cuda}"
mkdir -p "$out"
{ date -u; python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } > "$out/versions.txt"
if [ "$device" = "cuda" ]; then
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
  python -m pytest -q -m gpu tests/integration/test_accelerator_fold_engine.py 2>&1 | tee "$out/gpu-tests.txt"
  dtype=bfloat16; paper=(--reps 2 --baseline-windows 4 --batch-size auto)
else
  dtype=float32; paper=(--quick --reps 1 --batch-size 2)
fi
for shape in llava15 next; do
  python benchmarks/bench_fold_attention.py --device "$device" --dtype "$dtype" --shape "$shape" --flex --reps 5
done 2>&1 | tee "$out/fold-attention.txt"
python benchmarks/bench_paper.py --device "$device" "${paper[@]}" 2>&1 | tee "$out/bench-paper.txt"
