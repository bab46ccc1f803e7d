#!/usr/bin/env bash
# Every GPU measurement of filterprune, in one run (GPU time is scarce). From the repository root,
# on a machine with CUDA, PyTorch, torchvision, safetensors, tqdm and matplotlib:
#
#     OUT=benchmarks/gpu bash benchmarks/gpu.sh
#
# 1. bench_gpu.py: channel rounding, the self-check under TF32, rank() cost, fine-tuning throughput.
# 2. The blog's recipe at 224 through the CLI: VGG16 (with batch norm, trained from scratch: no
#    weights can be downloaded there) on image folders of Fashion-MNIST (benchmarks/make_folders.py,
#    made where the data is and carried as gpu_data/fashion), bf16 + channels_last.
# 3. bench_gpu.py: latency-aware against MACs-driven pruning.
# Each part writes its own log under $OUT, so a part that fails or runs out of time loses only itself.
set -u
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/env.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/env.txt"

python3 benchmarks/bench_gpu.py --sections round self-check rank train 2>&1 | tee "$OUT/bench_gpu.txt"

[ -d gpu_data/fashion ] || python3 benchmarks/make_folders.py gpu_data/fashion
start=$(date +%s)
python3 -m filterprune prune --data gpu_data/fashion --arch vgg16_bn --size 224 --device cuda --amp --channels-last \
    --batch-size 64 --workers 8 --optimizer adam --lr 5e-4 --head-epochs 0 --epochs 6 \
    --macs-step 1.5 --target-macs 5 --iterations 6 --epochs-between 2 --final-epochs 4 --out /tmp/blog --quiet 2>&1 \
    | tee "$OUT/blog.txt"
echo "blog recipe wall time, end to end (data, training from scratch, pruning, report): $(( $(date +%s) - start )) s" | tee -a "$OUT/blog.txt"
cp /tmp/blog/report.md "$OUT/blog_report.md" 2>/dev/null

python3 benchmarks/bench_gpu.py --sections latency-aware 2>&1 | tee "$OUT/latency_aware.txt"
