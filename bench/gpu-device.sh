#!/usr/bin/env bash
# On the GPU machine, after bench/gpu-pack.sh's pieces were copied to /tmp/stage: check every
# piece against SHA256SUMS, unpack onnxruntime-gpu into /tmp/ort-gpu, install the wheels into
# /tmp/site, then run bench/gpu.sh with --build (full-size fp16 model into /tmp/full16) and the
# given arguments. The run writes to scratch/bench/gpu (caches and images included); the table
# (gpu.log) and a tarball of the small logs go to $OUT when set (a device call returns at most 8
# files from there).
#
#   bash bench/gpu-device.sh [--stage DIR] [gpu.sh arguments, e.g. --devices cuda --steps 100]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage=/tmp/stage
if [ "${1:-}" = --stage ]; then stage=$2; shift 2; fi
out=scratch/bench/gpu
rm -rf "$out" && mkdir -p "$out"  # no stale logs from an earlier run in the table's tarball

(cd "$stage" && sha256sum --quiet -c base/SHA256SUMS) || {
    echo "pieces missing or damaged in $stage (see bench/gpu-pack.sh)" >&2
    exit 1
}
rm -rf /tmp/ort-gpu && mkdir -p /tmp/ort-gpu
cat "$stage"/ort-* | python3 -c '
import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="data")
' /tmp/ort-gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$stage"/base/whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
chmod +x "$stage/base/elite-ort"
set -o pipefail
bench/gpu.sh --binary "$stage/base/elite-ort" --ort-lib /tmp/ort-gpu/libonnxruntime.so.1.31.1 \
    --python python3 --build --model /tmp/full16 --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
if [ -n "${OUT:-}" ]; then
    cp "$out/gpu.log" "$OUT/"
    (cd "$out" && tar -czf "$OUT/logs.tgz" --ignore-failed-read ./*.err ./*.json ./*.time machine.txt)
fi
