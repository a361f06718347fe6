#!/usr/bin/env bash
# GPU benchmark of the runtime: the same generation on each requested device, timings as JSON.
#
#   bench/gpu.sh [--bundle DIR] [--ort-lib LIB] [--devices cpu,cuda,tensorrt] [--steps N]
#                [--size PX] [--binary PATH] [--out DIR]
#
# For each device it runs `elite-ort run --timings json` twice (the second start shows the
# effect of the graph cache on the CPU and of the TensorRT engine/timing cache on TensorRT),
# records wall time and peak RSS (/usr/bin/time), and prints a table. A device whose provider
# cannot be registered is reported with the runtime's own error (which names the missing
# library) and skipped: on a machine without a GPU the script still runs the CPU path, which is
# how it is tested here.
#
# Needs: a release binary (built here and carried to the GPU machine: it is self-contained
# apart from ONNX Runtime), the GPU build of ONNX Runtime 1.31.1 (`python3
# scripts/provision_ort.py --gpu`; pass its libonnxruntime.so.1.31.1 as --ort-lib), CUDA 13 /
# cuDNN 9 libraries (found through LD_LIBRARY_PATH; the script adds the nvidia/*/lib
# directories of a local PyTorch installation when there is one) and TensorRT 10 for
# `tensorrt`. Defaults: bundle scratch/full/bundle, devices cpu,cuda,tensorrt, 512², 20 steps.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

bundle=scratch/full/bundle
ort_lib=""
devices=cpu,cuda,tensorrt
steps=20
size=512
binary=""
out=scratch/bench/gpu
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) bundle=$2; shift 2 ;;
        --ort-lib) ort_lib=$2; shift 2 ;;
        --devices) devices=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$binary" ]; then
    cargo build --release --locked >&2
    binary=$(cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/elite-ort
fi
[ -x "$binary" ] || { echo "no binary at $binary" >&2; exit 1; }
[ -f "$bundle/elite.json" ] || { echo "$bundle is not a bundle" >&2; exit 1; }

# CUDA libraries from a local PyTorch (its nvidia-* wheels), if any.
if torch_nvidia=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null); then
    for lib in "$torch_nvidia"/nvidia/*/lib; do
        [ -d "$lib" ] && LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    export LD_LIBRARY_PATH
fi

mkdir -p "$out"
ort_args=()
[ -n "$ort_lib" ] && ort_args=(--ort-lib "$ort_lib")
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -srm), $(nproc) CPUs"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader || echo "gpu: none found (nvidia-smi missing)"
    "$binary" info --bundle "$bundle" --no-verify "${ort_args[@]}" | grep -E '^(onnxruntime|providers)'
} | tee "$out/machine.txt"

image=tests/golden/images/chelsea.png
mask=tests/golden/images/chelsea_mask.png
printf '\n| device | start | wall s | peak RSS GiB | load s | concept s | denoise step s | decode s |\n'
printf '|---|---|---:|---:|---:|---:|---:|---:|\n'
IFS=, read -ra list <<<"$devices"
for device in "${list[@]}"; do
    extra=()
    case "$device" in
        tensorrt) extra=(--trt-fp16 --trt-cache "$out/trt-cache") ;;
    esac
    for start in first second; do
        log="$out/$device-$start"
        if ! ELITE_ORT_CACHE_DIR="$out/cache" /usr/bin/time -f '%e %M' -o "$log.time" \
            "$binary" run --bundle "$bundle" --device "$device" "${extra[@]}" "${ort_args[@]}" \
            --image "$image" --mask "$mask" --prompt "a photo of a S" --steps "$steps" \
            --height "$size" --width "$size" --quiet --force --timings json \
            --out "$out/$device.png" >"$log.json" 2>"$log.err"; then
            printf '| %s | %s | failed: %s |\n' "$device" "$start" \
                "$(grep -m1 '^error' "$log.err" | cut -c1-160)"
            break
        fi
        python3 - "$device" "$start" "$log.json" "$log.time" <<'EOF'
import json, statistics, sys
device, start, doc_path, time_path = sys.argv[1:]
doc = json.loads([l for l in open(doc_path) if l.startswith("{")][-1])
wall, rss_kb = open(time_path).read().split()[-2:]
load = sum(v for k, v in doc.items() if k.startswith("load "))
concept = doc.get("preprocess", 0) + doc.get("encode concept", 0)
step = statistics.median(doc["denoise step"])
print(f"| {device} | {start} | {float(wall):.2f} | {int(rss_kb) / 2**20:.2f} | {load:.2f} "
      f"| {concept:.3f} | {step:.3f} | {doc['decode']:.3f} |")
EOF
    done
done
echo
echo "logs and images: $out"
