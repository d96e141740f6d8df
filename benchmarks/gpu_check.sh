#!/usr/bin/env bash
# scatstore's GPU check: one run, one table (benchmarks/gpu_check.py says what each section does).
# Sized for one H100/H200 in under 8 minutes; needs no internet. Run from the repository root:
#
#   bash benchmarks/gpu_check.sh              # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # same code paths on the CPU, tiny sizes
#
# Uses the repository's code from this checkout (PYTHONPATH, or an installed
# `pip install --no-deps -e .`). PYTHON picks the interpreter (default: python3).
# Each section runs in the same process under its own guard; a whole-run limit of
# GPU_CHECK_TIMEOUT seconds (default 470) keeps it inside the 8 minutes even if a section hangs.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import scatstore" 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# (from a plain checkout, pipelines/ is mapped to scatstore.pipelines by gpu_check.py itself)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
echo "== scatstore gpu_check $(date -u +%FT%TZ) on $(hostname) =="
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
[ -f /work/shared/tools/machine.sh ] && bash /work/shared/tools/machine.sh 2>/dev/null
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit: /'
timeout --signal=INT "${GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: stopped at the ${GPU_CHECK_TIMEOUT:-470} s limit"
exit $rc
