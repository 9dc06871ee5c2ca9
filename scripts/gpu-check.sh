#!/usr/bin/env bash
# One prepared GPU check (issue 4): install, GPU conformance, and the GPU benchmark, in under 8 minutes.
#
#   scripts/gpu-check.sh [cuda|rocm]        (default: cuda, or rocm when torch is a ROCm build)
#
# Assumes torch and triton are already installed (the GPU machine is offline); installs anyaccel without
# dependencies, plus pluggy/rich/hypothesis only if missing and installable. Writes its reports to
# ${OUT:-gpu-check-out}/ and prints the figures. Exit code: non-zero if conformance fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
BACKEND=${1:-$($PY -c 'import torch; print("rocm" if getattr(torch.version, "hip", None) else "cuda")')}
export HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1

step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "hip", getattr(torch.version, "hip", None))
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
import triton; print("triton", triton.__version__)
PY

step "install anyaccel (no deps)"
for mod in pluggy rich hypothesis; do
  $PY -c "import $mod" 2>/dev/null || $PY -m pip install -q "$mod" || echo "warning: $mod missing and not installable"
done
$PY -m pip install -q --no-deps -e . || { echo "install failed"; exit 2; }
$PY -m anyaccel backends

step "explain: which kernels $BACKEND selects"
$PY -m anyaccel explain gemm --backend "$BACKEND" --dtype bfloat16 --in-features 4096 --out-features 4096 || true
$PY -m anyaccel explain gemm --backend "$BACKEND" --dtype bfloat16 --in-features 64 --out-features 64 || true
$PY -m anyaccel explain attention --backend "$BACKEND" --dtype bfloat16 --num-heads 32 --num-kv-heads 8 \
  --head-size 128 --block-size 16 || true

step "conformance --backend $BACKEND"
timeout 300 $PY -m anyaccel conformance --backend "$BACKEND" --json "$OUT/conformance.json" \
  --markdown "$OUT/conformance.md"
CONF_RC=$?
echo "conformance exit code: $CONF_RC"

step "bench ops --backend $BACKEND (generic cases + issue-4 GPU cases)"
timeout 240 $PY -m anyaccel bench ops --backend "$BACKEND" --json "$OUT/bench.json" || echo "bench ops exit code $?"

step "issue-4 GPU cases directly (in case bench ops does not include them)"
timeout 150 $PY - "$BACKEND" "$OUT/bench-gpu.json" <<'PY'
import json, sys
from anyaccel.plugins import discover
from anyaccel.bench import gpu
b = discover().get(sys.argv[1])
assert b.available, b.reason
recs = gpu.run(b, progress=lambda m: print(" ", m, flush=True))
for r in recs:
    print(f"  {r['case']:<48} {r['dtype']:<9} ratio {r['ratio'] if r['ratio'] is None else round(r['ratio'], 3)!s:<7}"
          f" target {r['target']:<7} passed {r['passed']!s:<5} {r['note']} {r['error']}")
json.dump({"backend": b.name, "properties": {k: str(v) for k, v in b.properties.items()}, "records": recs},
          open(sys.argv[2], "w"), indent=1)
PY

step "done: reports in $OUT/"
exit $CONF_RC
