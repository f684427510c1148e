#!/usr/bin/env bash
# GPU benchmark of qvl vs transformers 4.57.6 on full-size random weights (bf16).
# Run from the repository root on the lent H100/H200:   bash benchmarks/gpu_bench.sh
# Results (markdown tables, JSON, versions, nvidia-smi) go under $OUT (default ./out), step by step,
# so a step that runs out of time still leaves the earlier ones. Expected total: ~6 minutes
# (each case is a fresh process that builds the full-size model on the GPU).
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
B="$PY benchmarks/bench_models.py --device cuda --dtype bf16 --full --rounds 1"

# 1) decode: prefill 1024 + 64 decode steps, all 28 / 36 layers, transformers vs qvl (eager)   ~2.5 min
timeout 200 $B --skip vision --repeats 2 --timeout 90 --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.md"
# 2) qvl decode with torch.compile, Qwen2-VL-2B shapes only (compilation dominates)           ~2 min
timeout 150 $B --skip vision --impls qvl+compile --gens 2 --repeats 2 --timeout 140 --json "$OUT/decode_compile.json" 2>&1 | tee "$OUT/decode_compile.md"
# 3) vision towers, full depth 32, one 1008² image, median-free best of 3                      ~1.5 min
timeout 120 $B --skip decode --sizes 1008 --repeats 3 --timeout 50 --json "$OUT/vision.json" 2>&1 | tee "$OUT/vision.md"
echo "done: results in $OUT"
