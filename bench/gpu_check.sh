#!/usr/bin/env bash
# tagmill's CUDA path on a machine with an NVIDIA GPU, in one pass (~8 minutes):
#
#   bench/gpu_check.sh [OUT_DIR]            # PYTHON=... to pick the interpreter
#
# 1. what the machine has (torch, CUDA, cuDNN, bf16, onnxruntime's providers);
# 2. the tests whose "auto" device becomes the GPU there (training, export, predict,
#    torchrun's refusals) plus tests/test_cuda.py, which only runs where a GPU is;
# 3. the sample data (Fashion-MNIST, 2,500 PNGs) imported, then the same training
#    (converged head + 3 whole-network epochs) on the GPU in fp32 and in bf16 autocast,
#    and on this machine's CPUs, each timed;
# 4. predict over the 2,500 images on the GPU and on the CPUs, and a real server on the GPU;
# 5. bench/train_speed.py on the GPU (compute only, against the measured matmul peak).
# Each step has its own time limit so the whole pass ends; logs land in OUT_DIR.
set -u
out=${1:-gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sample=sample_data/fashion-mnist

section() { echo; echo "=== $(date +%T) $*"; }
timed() {  # timed LIMIT LOG CMD...: run CMD under LIMIT seconds, log it, print its wall time
  local limit=$1 log=$2 start end code
  shift 2
  start=$(date +%s.%N)
  timeout "$limit" "$@" >"$log" 2>&1
  code=$?
  end=$(date +%s.%N)
  printf "exit %s, %s s: %s\n" "$code" "$(awk -v a="$start" -v b="$end" "BEGIN { printf \"%.1f\", b - a }")" "$*"
  tail -n 4 "$log"
}

section "machine"
$py - <<'EOF'
import os, platform
import torch, onnxruntime as ort
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "|", os.cpu_count(), "CPUs")
print("GPU:", torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| bf16:", torch.cuda.is_bf16_supported())
print("onnxruntime", ort.__version__, ort.get_available_providers())
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

section "tests where the GPU is the default device"
timeout 200 $py -m pytest -q -p no:cacheprovider -n 8 -o addopts=-ra tests/test_cuda.py tests/train/test_loop.py \
  tests/train/test_distributed.py tests/test_cli_train_to_predict.py tests/test_cli_backbones.py >"$out/pytest.log" 2>&1
echo "pytest exit $?"
grep -E "passed|failed|error" "$out/pytest.log" | tail -n 15

section "import the sample"
timed 120 "$out/import.log" $py -m tagmill import "$sample/labels.csv" --images "$sample/images" --suffix .png \
  --val-fraction 0.2 --out "$work/ds"

for mode in "cuda fp32" "cuda bf16" "cpu fp32"; do
  set -- $mode
  section "train --device $1 --precision $2 --epochs 3"
  timed 130 "$out/train-$1-$2.log" $py -m tagmill train "$work/ds" --out "$work/run-$1-$2" --device "$1" \
    --precision "$2" --epochs 3
  grep -hE "epoch|best|stage" "$out/train-$1-$2.log" | tail -n 6
done

section "export, predict on the GPU and on the CPUs"
timed 60 "$out/export.log" $py -m tagmill export "$work/run-cuda-fp32" --out "$work/bundle" --onnx
for device in cuda cpu; do
  timed 120 "$out/predict-$device.log" $py -m tagmill predict "$work/bundle" "$sample/images" --device "$device" \
    --jsonl "$work/pred-$device.jsonl"
done
$py - "$work/pred-cuda.jsonl" "$work/pred-cpu.jsonl" <<'EOF'
import json, sys
gpu, cpu = ([json.loads(line) for line in open(path)] for path in sys.argv[1:])
same = sum(a.get("labels") == b.get("labels") for a, b in zip(gpu, cpu))
worst = max(max(abs(p - q) for p, q in zip(a["probabilities"], b["probabilities"])) for a, b in zip(gpu, cpu))
print(f"GPU vs CPU: {len(gpu)} and {len(cpu)} answers, same label {same}, largest probability difference {worst:.2e}")
EOF
timed 60 "$out/predict-onnx-cuda.log" $py -m tagmill predict "$work/bundle" "$sample/images/00000.png" --backend onnx \
  --device cuda

section "serve on the GPU"
$py -m tagmill serve "$work/bundle" --device cuda --port 8719 >"$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 60); do curl -sf localhost:8719/ping >/dev/null && break; sleep 1; done
curl -s localhost:8719/readyz; echo
curl -s -X POST -H "Content-Type: image/png" --data-binary "@$sample/images/00001.png" localhost:8719/invocations; echo
kill $server; wait $server 2>/dev/null

section "bench/train_speed.py on the GPU"
timeout 150 $py bench/train_speed.py --device cuda --seconds 3 2>&1 | tee "$out/train_speed.log" | tail -n 14
section "done"
