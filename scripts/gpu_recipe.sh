#!/usr/bin/env bash
# The qvl-tiny recipe for all three generations on one lent GPU, with the command a CPU runs too:
#     python -m qvl.train recipe --generation G --device cuda --scale $SCALE $VARIANT
# Run from the repository root on the device machine:   SCALE=2 bash scripts/gpu_recipe.sh
#
# The three generations train at once: one tiny model leaves an H100/H200 mostly idle, and the machine's
# 16 cores render the generated data (each recipe gets $WORKERS DataLoader workers). Every recipe is boxed
# to $BOX seconds; the recipe skips the stages that finished and resumes the one that did not, so calling
# this again on the same warm machine continues where the box stopped it (runs/ is kept between calls).
# What comes back under $OUT (at most 8 files): qvl-tiny-{1,2,2.5}.tar (the shipped directory, bf16, with
# its training_report.json) for each generation that finished, recipe logs, nvidia-smi, a summary table.
#
# Settings (environment):  SCALE (stage budgets x, default 1)   BOX (seconds, default 520)
#   GENS ("2.5 2 1")   WORKERS (4)   DEVICE (cuda; cpu only to try the script itself: SCALE=0.002)
#   VARIANT (extra recipe flags, e.g. "--rope-theta 100 --object-curriculum 0.25:1,0.5:2")
#   WORK (runs/gpu)   EVAL_N (200)
set -uo pipefail
OUT="${OUT:-./out}"
SCALE="${SCALE:-1}"; BOX="${BOX:-520}"; GENS="${GENS:-2.5 2 1}"; WORKERS="${WORKERS:-4}"
DEVICE="${DEVICE:-cuda}"; VARIANT="${VARIANT:-}"; WORK="${WORK:-runs/gpu}"; EVAL_N="${EVAL_N:-200}"
mkdir -p "$OUT" "$WORK"
T0=$SECONDS

# A python that has torch (with CUDA when DEVICE=cuda); qvl itself is imported from this checkout.
PY=""
for cand in .venv/bin/python python3 python; do
  command -v "$cand" >/dev/null 2>&1 || continue
  if [ "$DEVICE" = cuda ]; then
    "$cand" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && { PY="$cand"; break; }
  else
    "$cand" -c 'import torch' 2>/dev/null && { PY="$cand"; break; }
  fi
done
if [ -z "$PY" ]; then echo "no python with torch${DEVICE:+ ($DEVICE)} found" | tee "$OUT/error.txt"; exit 1; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c 'import torch; print("torch", torch.__version__, "| cuda", torch.cuda.is_available() and torch.cuda.get_device_name())' \
  | tee "$OUT/versions.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || rm -f "$OUT/nvidia-smi.txt"

# The tokenizers are shared by the three recipes: build them once before they start side by side.
"$PY" -c "from qvl.train import tiny; tiny.build_tokenizers('$WORK/tokenizer')" || exit 1

pids=()
for g in $GENS; do
  # gen 2 shares gen 2.5's LM stand-in when that one has finished (qvl.train.__main__.SHARED_LM); started
  # together, gen 2 trains its own unless a previous call already left gen 2.5's lm-pretrain in $WORK.
  # shellcheck disable=SC2086
  timeout "$BOX" "$PY" -m qvl.train recipe --generation "$g" --device "$DEVICE" --scale "$SCALE" \
    --work "$WORK" --out "$WORK/ship" --eval-n "$EVAL_N" --workers "$WORKERS" $VARIANT \
    > "$WORK/recipe-$g.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
echo "recipes returned after $((SECONDS - T0)) s" | tee "$OUT/timeline.txt"

# Logs: progress bars are carriage-return lines; keep each stage's last one.
for g in $GENS; do
  echo "=== gen $g ==="
  tr '\r' '\n' < "$WORK/recipe-$g.log" | grep -v '^\s*$' | awk '/samples\/s/ {last=$0; next} {if (last) print last; last=""; print} END {if (last) print last}'
done > "$OUT/logs.txt"

"$PY" - "$WORK" $GENS <<'PYEOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
work, gens = Path(sys.argv[1]), sys.argv[2:]
print("| gen | stage | samples | samples/s | seconds | probe |")
print("|---|---|---:|---:|---:|---|")
for g in gens:
    for sdir in sorted((work / f"gen{g}").glob("*/summary.json"), key=lambda p: p.stat().st_mtime):
        s = json.loads(sdir.read_text())
        probe = sdir.parent / "probe.json"
        p = json.loads(probe.read_text()) if probe.exists() else {}
        print(f"| {g} | {sdir.parent.name} | {s.get('samples', '')} | {s.get('samples_per_s', '')} | "
              f"{s.get('seconds', '')} | {', '.join(f'{k} {v:.2f}' for k, v in p.items())} |")
    report = work / f"gen{g}" / "report.json"
    if report.exists():
        ev = json.loads(report.read_text())["eval"]
        print(f"\ngen {g} eval: " + ", ".join(f"{t} {r['score']:.3f}" for t, r in ev.items()) + "\n")
PYEOF

for g in $GENS; do
  ship="$WORK/ship/qvl-tiny-$g"
  [ -f "$ship/training_report.json" ] && tar -cf "$OUT/qvl-tiny-$g.tar" -C "$WORK/ship" "qvl-tiny-$g"
done
echo "done after $((SECONDS - T0)) s: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$OUT/timeline.txt"
