#!/usr/bin/env bash
# Pack what bench/gpu.sh needs on a GPU machine that can download nothing and receives at most
# 64 MiB per call (this workplace's device machines; see bench/README.md, "On a GPU"):
#
#   .gpu-carry/base/        the release binary, the wheels the device image lacks (diffusers,
#                           open_clip_torch, importlib_metadata) and SHA256SUMS of every piece
#   .gpu-carry/ort-NN       onnxruntime-gpu 1.31.1's libraries (300 MB), tar | xz, split into
#                           --part-mb pieces (default 36: the tracked tree is ~22 MB of a call)
#
#   bench/gpu-pack.sh [--part-mb N]
#
# Then one device call per piece, each carrying that piece and copying it to /tmp/stage (the
# machine keeps /tmp while it stays warm between calls), and a last call that runs
# bench/gpu-device.sh. The script prints those calls. `.gpu-carry/` is git-ignored.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
part_mb=36
while [ $# -gt 0 ]; do
    case "$1" in
        --part-mb) part_mb=$2; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

ort_dir=.ort/onnxruntime-gpu-1.31.1
[ -f "$ort_dir/libonnxruntime.so.1.31.1" ] || python3 scripts/provision_ort.py --gpu
cargo build --release --locked >&2
binary=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/elite-ort

rm -rf .gpu-carry
mkdir -p .gpu-carry/base/whl
cp "$binary" .gpu-carry/base/elite-ort
# Pure-Python wheels, pinned as in export/requirements*.txt (importlib_metadata: diffusers' one
# requirement the device image does not hold).
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu-carry/base/whl \
    diffusers==0.42.1 open_clip_torch==3.3.0 importlib_metadata==10.2.0
tar -C "$ort_dir" -cf - . | xz -6 -T0 | split -b "${part_mb}M" -d - .gpu-carry/ort-
(cd .gpu-carry && sha256sum base/elite-ort base/whl/*.whl ort-* > base/SHA256SUMS)
du -sh .gpu-carry/base .gpu-carry/ort-* >&2

echo "device calls, in order, on one warm machine (each under 64 MiB with the tree):"
for piece in .gpu-carry/base .gpu-carry/ort-*; do
    echo "  carry [\"$piece\"]  command: mkdir -p /tmp/stage && cp -r $piece /tmp/stage/"
done
echo "  then: bash bench/gpu-device.sh --devices cuda   (timeout_s 600; results under \$OUT)"
