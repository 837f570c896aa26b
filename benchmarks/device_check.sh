#!/usr/bin/env bash
# GPU check in one go (issue 17): the gpu-marked tests, the GPU training speed (bench_train --part
# speed-gpu: 10M synthetic events, hidden 100, batch 64 and 512, n_sample 2048, CUDA graphs and bf16
# on/off) and batch scoring (bench_score 1M users x 100k items), then one table. Budget: < 8 minutes on
# an H100/H200 (each part has its own time limit). Without CUDA it prints "no CUDA: skipped" and exits 0.
#
#   benchmarks/device_check.sh            # results in benchmarks/results/device_check/ (or $OUT_DIR)
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no CUDA: skipped"
  exit 0
fi
OUT="${OUT_DIR:-benchmarks/results/device_check}"
mkdir -p "$OUT"
START=$(date +%s)
"$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

echo "== gpu tests (limit 150 s)"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
echo "== bench_train speed-gpu (limit 240 s)"
timeout 240 "$PY" benchmarks/bench_train.py --part speed-gpu --device cuda --out "$OUT/bench_train_gpu.json" \
  > "$OUT/bench_train_gpu.log" 2>&1
echo "   exit $? (log $OUT/bench_train_gpu.log)"
echo "== bench_score 1M x 100k on cuda (limit 200 s)"
timeout 200 "$PY" benchmarks/bench_score.py --sizes 1M:100k --device cuda --baseline-users 100 \
  --out "$OUT/bench_score_gpu.json" > "$OUT/bench_score_gpu.log" 2>&1
echo "   exit $? (log $OUT/bench_score_gpu.log)"

"$PY" - "$OUT" "$START" <<'EOF'
import json, os, re, sys, time
from pathlib import Path

out, start = Path(sys.argv[1]), int(sys.argv[2])
rows = []  # (check, setting, figure, target)
log = (out / "gpu_tests.log").read_text() if (out / "gpu_tests.log").exists() else ""
summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", log, re.M)
rows.append(("pytest -m gpu", "tests/gpu", summary[-1] if summary else "no summary (see log)", "all pass"))
train = out / "bench_train_gpu.json"
if train.exists():
    for r in json.loads(train.read_text()).get("speed_gpu", {}).get("runs", []):
        target = {64: ">= 250,000", 512: ">= 1,000,000"}[r["batch_size"]] if r["step"] == "fast" else ""
        rows.append(("train events/s", f"batch {r['batch_size']} {r['step']} graphs={r['cuda_graphs']} "
                     f"bf16={r['bf16']}", f"{r['events_per_second']:,.0f}", target))
else:
    rows.append(("train events/s", "bench_train speed-gpu", "no result (see log)", ""))
score = out / "bench_score_gpu.json"
if score.exists():
    data = json.loads(score.read_text())
    for r in data.values():  # bench_score merges results by size/device/precision
        if isinstance(r, dict) and "users_per_s" in r:
            rows.append(("score users/s", f"{r['size']} {r['device']} {r['precision']}",
                         f"{r['users_per_s']:,}", ""))
else:
    rows.append(("score users/s", "bench_score 1M x 100k", "no result (see log)", ""))
w = [max(len(str(r[i])) for r in rows + [("check", "setting", "figure", "target")]) for i in range(4)]
line = lambda r: " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r))  # noqa: E731
print(line(("check", "setting", "figure", "target")))
print("-+-".join("-" * x for x in w))
for r in rows:
    print(line(r))
print(f"total {time.time() - start:.0f} s; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
EOF
