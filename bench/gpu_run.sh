#!/usr/bin/env bash
# One call on a CUDA machine that has torch: install what else mpis needs from wheels carried beside the
# checkout (.whl/, or $MPIS_WHEELS; a missing package only skips what needs it), then run every GPU stage
# of bench/gpu_run.py, writing OUT/gpu_run.json and OUT/gpu_run.log within 9 minutes.
#   bash bench/gpu_run.sh --out "$OUT" --data-dir shared/data     # on the GPU machine
#   bash bench/gpu_run.sh --smoke --out /tmp/smoke                 # the same stages on the CPU, small
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${MPIS_WHEELS:-.whl}"
if ls "$wheels"/*.whl >/dev/null 2>&1; then
    site="${TMPDIR:-/tmp}/mpis-gpu-site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheels"/*.whl || echo "gpu_run: some wheels did not install; their stages will say so" >&2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import mpis" 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHONUNBUFFERED=1 exec python3 bench/gpu_run.py "$@"
