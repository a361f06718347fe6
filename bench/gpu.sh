#!/usr/bin/env bash
# GPU benchmark: the runtime on each requested device and the PyTorch reference (fp16 on CUDA,
# as the official scripts run), the same generation, in one table.
#
#   bench/gpu.sh [--model DIR] [--build] [--ort-lib LIB] [--devices cpu,cuda,tensorrt]
#                [--reference DEVICE|none] [--reference-dtype fp16|fp32] [--python PY]
#                [--steps N] [--size PX] [--binary PATH] [--out DIR]
#
# --model DIR holds bundle/ (what the runtime loads) and upstream/ (what the reference loads),
# as `python -m export full-random --out DIR [--fp16]` writes them; --build writes them first
# when DIR/bundle is missing (fp16 bundle, full SD v1-4 / CLIP-L / ELITE dimensions, random
# weights: minutes of CPU). For each device it runs `elite-ort run --timings json` twice (the
# second start shows the effect of the graph cache on the CPU and of the TensorRT engine/timing
# cache on TensorRT), then `bench/reference_run.py --device DEVICE --dtype fp16` twice, records
# wall time and peak RSS (/usr/bin/time) and prints one table. A device whose provider cannot be
# registered is reported with the runtime's own error (which names the missing library) and
# skipped: on a machine without a GPU the script still runs the CPU paths (`--devices cpu
# --reference cpu --reference-dtype fp32`), which is how it is tested here.
#
# Needs: a release binary (built here and carried to the GPU machine: it is self-contained
# apart from ONNX Runtime), the GPU build of ONNX Runtime 1.31.1 (`python3
# scripts/provision_ort.py --gpu`; pass its libonnxruntime.so.1.31.1 as --ort-lib), CUDA 13 /
# cuDNN 9 libraries (found through LD_LIBRARY_PATH; the script adds the nvidia/*/lib
# directories of a local PyTorch installation when there is one) and TensorRT 10 for
# `tensorrt`. The reference needs torch with CUDA, transformers and diffusers (--python, default
# .venv/bin/python when it exists, else python3). Defaults: model scratch/full16, devices
# cuda,tensorrt, reference cuda fp16, 512², 100 steps (the issue's GPU setting).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

model=scratch/full16
build=0
ort_lib=""
devices=cuda,tensorrt
reference=cuda
reference_dtype=fp16
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
steps=100
size=512
binary=""
out=scratch/bench/gpu
while [ $# -gt 0 ]; do
    case "$1" in
        --model) model=$2; shift 2 ;;
        --build) build=1; shift ;;
        --reference) reference=$2; shift 2 ;;
        --reference-dtype) reference_dtype=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --ort-lib) ort_lib=$2; shift 2 ;;
        --devices) devices=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$binary" ]; then
    cargo build --release --locked >&2
    binary=$(cargo metadata --format-version 1 --no-deps \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/elite-ort
fi
[ -x "$binary" ] || { echo "no binary at $binary" >&2; exit 1; }
bundle=$model/bundle
upstream=$model/upstream
if [ ! -f "$bundle/elite.json" ] && [ "$build" = 1 ]; then
    echo "building an fp16 full-size random model in $model (python -m export full-random)" >&2
    /usr/bin/time -f 'export: %e s, peak RSS %M KiB' \
        "$python" -m export full-random --fp16 --out "$model" >&2
fi
[ -f "$bundle/elite.json" ] || { echo "$bundle is not a bundle (--build writes one)" >&2; exit 1; }

# CUDA libraries from a local PyTorch (its nvidia-* wheels), if any.
if torch_nvidia=$("$python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null); then
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
# One table row from a run's JSON timings (ours or the reference's) and its /usr/bin/time line.
row() {
    "$python" - "$@" <<'EOF'
import json, statistics, sys
who, start, doc_path, time_path = sys.argv[1:]
doc = json.loads([l for l in open(doc_path) if l.startswith("{")][-1])
wall, rss_kb = open(time_path).read().split()[-2:]
load = doc["load"] if "load" in doc else sum(v for k, v in doc.items() if k.startswith("load "))
concept = doc.get("preprocess", 0) + doc.get("encode concept", 0)
step = statistics.median(doc["denoise step"])
print(f"| {who} | {start} | {float(wall):.2f} | {int(rss_kb) / 2**20:.2f} | {load:.2f} "
      f"| {1000 * concept:.1f} | {1000 * step:.1f} | {1000 * doc['decode']:.1f} |")
EOF
}

printf '\n%s, %s², %s steps\n' "$bundle" "$size" "$steps"
printf '\n| run | start | wall s | peak RSS GiB | load s | concept ms | denoise step ms | decode ms |\n'
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
            printf '| elite-ort %s | %s | failed: %s |\n' "$device" "$start" \
                "$(grep -m1 '^error' "$log.err" | cut -c1-160)"
            break
        fi
        row "elite-ort $device" "$start" "$log.json" "$log.time"
    done
done
if [ "$reference" != none ]; then
    [ -d "$upstream" ] || { echo "no upstream model at $upstream for the reference" >&2; exit 1; }
    for start in first second; do
        log="$out/reference-$start"
        if ! /usr/bin/time -f '%e %M' -o "$log.time" "$python" bench/reference_run.py \
            --upstream "$upstream" --size full --device "$reference" --dtype "$reference_dtype" \
            --image "$image" --mask "$mask" --prompt "a photo of a S" --steps "$steps" \
            --height "$size" --width "$size" --out "$out/reference.png" >"$log.json" 2>"$log.err"; then
            printf '| reference %s %s | %s | failed: %s |\n' "$reference" "$reference_dtype" \
                "$start" "$(tail -1 "$log.err" | cut -c1-160)"
            break
        fi
        row "reference $reference $reference_dtype" "$start" "$log.json" "$log.time"
    done
fi

# Step-level batching on each device: eight generations in one engine against eight processes,
# and the per-row cost of one UNet call at growing batch sizes (bench/batching.py; stdlib only).
# CUDA only: every --max-batch is another TensorRT profile, hence another engine build.
# Then the server under load on the same device, batched (--max-batch 16, 32) against
# unbatched (--max-batch 2), where the gain of step-level batching is expected.
for device in "${list[@]}"; do
    [ "$device" = cuda ] || continue
    extra=(--arg=--device --arg="$device")
    for a in "${ort_args[@]}"; do extra+=(--arg="$a"); done
    echo
    if ! python3 bench/batching.py --bundle "$bundle" --binary "$binary" --steps 20 \
        --image-size "$size" --sizes 2,4,8,16,32 --max-contention 1 "${extra[@]}" \
        >"$out/batching-$device.md" 2>"$out/batching-$device.err"; then
        echo "batching on $device failed: $(tail -1 "$out/batching-$device.err" | cut -c1-160)"
    fi
    cat "$out/batching-$device.md"
    # The server under load, batched against unbatched (bench/serve.py; stdlib only).
    echo
    if ! python3 bench/serve.py --bundle "$bundle" --binary "$binary" --steps 20 \
        --image-size "$size" --requests 32 --batches 2,16,32 --concurrency 1,8,32 \
        --max-contention 1 --no-memory "${extra[@]}" \
        >"$out/serve-$device.md" 2>"$out/serve-$device.err"; then
        echo "serving on $device failed: $(tail -1 "$out/serve-$device.err" | cut -c1-160)"
    fi
    cat "$out/serve-$device.md"
done
echo
echo "logs and images: $out"
