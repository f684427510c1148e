#!/usr/bin/env bash
# GPU benchmark of qvl vs transformers 4.57.6 on full-size random weights (bf16).
# Run from the repository root on the lent H100/H200:   bash benchmarks/gpu_bench.sh
# Results (markdown tables + JSON + nvidia-smi) go under $OUT (default ./out).
# Budget: about 6-9 minutes in all (decode first: it is the headline number; every case has its own timeout).
set -uo pipefail
OUT="${OUT:-./out}"
mkdir -p "$OUT"

# Prefer the project venv when it has a CUDA torch, else whatever python has one.
PY=python3
for cand in .venv/bin/python python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PY="$cand"; break
  fi
done
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "no importable torch; this script installs nothing but transformers/safetensors/tokenizers" | tee "$OUT/error.txt"
  exit 1
fi
# Install the oracle only if it is missing or another version.
if ! "$PY" -c 'import transformers, safetensors, tokenizers, sys; sys.exit(0 if transformers.__version__ == "4.57.6" else 1)' 2>/dev/null; then
  "$PY" -m pip install -q "transformers==4.57.6" safetensors tokenizers 2>&1 | tail -3
fi
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "|", torch.cuda.get_device_name())' | tee "$OUT/versions.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# 1) decode (prefill 1024 + 64 decode steps), full 28 / 36 layers, with and without torch.compile
timeout 330 "$PY" benchmarks/bench_models.py --device cuda --dtype bf16 --full --compile --skip vision \
  --timeout 150 --json "$OUT/bench_gpu_decode.json" 2>&1 | tee "$OUT/bench_gpu_decode.md"
# 2) vision towers, full depth 32, at 448², 1008², 1344² (median of 3)
timeout 240 "$PY" benchmarks/bench_models.py --device cuda --dtype bf16 --full --repeats 3 --skip decode \
  --timeout 60 --json "$OUT/bench_gpu_vision.json" 2>&1 | tee "$OUT/bench_gpu_vision.md"
echo "done: results in $OUT"
