"""Side-by-side benchmark: the Rust runtime against the PyTorch reference pipeline.

    .venv/bin/python bench/run.py --size tiny            # onnx/tiny, 256², 20 steps
    .venv/bin/python bench/run.py --size full            # scratch/full (python -m export full-random)

Both run the same weights (the bundle and the upstream-format files it was exported from), the
same concept image, prompt, seed, size, steps, guidance and λ. Each repetition starts one
``elite-ort run --timings json`` process and one ``bench/reference_run.py`` process, alternating
which goes first; an untimed warm-up pair runs first so both read the weights from a warm page
cache. The report gives medians per stage, the ratio ours / reference, and each process's peak
resident memory (``ru_maxrss`` of that child, from ``wait4``). Raw samples go to a JSON file.
It also prints what each counted run read from the disk (``ru_inblock``): a warm page cache is
not guaranteed between runs — hosts with proactive reclaim (DAMON ``pageout`` of pages idle for
a minute, seen on a 2-core guest; bench/RESULTS.md) evict weights a run reads only once —
so that a run that read part of its weights from the disk can be told apart (there, 1.5 GB of
weights evicted on purpose cost the CLI ~0.3 s of concept stage and ~0.2 s of decode).

Stages (same definition on both sides):
  load          creating the ONNX Runtime sessions / loading the PyTorch modules
  concept       preprocessing, both CLIP passes (ours: one batch-2 call) and both mappers
  text          text encoding, conditional and unconditional
  denoise step  median of the per-step times (ours: one batch-2 UNet call; reference: two
                batch-1 calls), guidance and the LMS step included
  decode        VAE decode to uint8
  end to end    process wall time, start to exit, as measured by this driver (interpreter and
                library start-up, loading and PNG writing included)

The roofline: in the same run (before and after the repetitions) the machine's fp32 GEMM rate is
measured through ONNX Runtime and through torch (``bench/roofline.py``), and each stage's work is
counted (``bench/flops.py``: ours from the ONNX graphs at this run's shapes, the reference from
its PyTorch modules). Per stage and side the report prints the achieved GFLOP/s and its fraction
of that side's GEMM rate (the higher of the two measurements), so that rows from different
machines can be compared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "tests/golden/images/chelsea.png"
MASK = ROOT / "tests/golden/images/chelsea_mask.png"
PROMPT = "a photo of a S"

# Per size: bundle, upstream directory, and settings. The full size runs at reduced resolution
# and steps so that a repetition takes minutes, not an hour, on a small CPU machine.
SIZES: dict[str, dict[str, object]] = {
    "tiny": {
        "bundle": "onnx/tiny",
        "upstream": "scratch/tiny/upstream",
        "height": 256,
        "width": 256,
        "steps": 20,
    },
    "full": {
        "bundle": "scratch/full/bundle",
        "upstream": "scratch/full/upstream",
        "height": 256,
        "width": 256,
        "steps": 4,
    },
}

# Targets of issue 4 (full size): ours / reference at most this.
TARGETS = {"denoise step": 0.6, "concept": 0.5, "end to end": 0.5, "peak RSS": 0.8}
ROWS = ["load", "concept", "text", "denoise step", "decode", "end to end", "peak RSS", "CPU time"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def shown(path: Path) -> str:
    """A path relative to the repository when it is inside it (bundles may live elsewhere)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def cargo_binary(build: bool) -> Path:
    if build:
        log("cargo build --release --locked")
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    binary = Path(json.loads(meta.stdout)["target_directory"]) / "release" / "elite-ort"
    if not binary.is_file():
        raise SystemExit(f"{binary} not found: build it (drop --no-build)")
    return binary


def ensure_upstream(size: str, upstream: Path) -> None:
    if (upstream / "model_config.json").is_file():
        return
    if size != "tiny":
        raise SystemExit(
            f"{upstream} is missing: run `.venv/bin/python -m export full-random --out "
            f"{upstream.parent}` first (about 11 GB of disk, see bench/README.md)"
        )
    log(f"writing the tiny model's upstream files to {upstream}")
    code = (
        "import sys; from pathlib import Path; from export.tiny import write_tiny_upstream; "
        "write_tiny_upstream(Path(sys.argv[1]))"
    )
    upstream.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(upstream)], cwd=ROOT, check=True)


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def machine_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over the next ``seconds``."""
    b0, t0 = cpu_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_jiffies()
    return (b1 - b0) / max(t1 - t0, 1)


def wait_idle(max_busy: float, timeout: float) -> float:
    """Waits (up to ``timeout`` s) until other processes leave the CPUs; returns the last load."""
    start = time.monotonic()
    busy = machine_busy()
    while busy > max_busy and time.monotonic() - start < timeout:
        log(f"machine {busy:.0%} busy: waiting for other work to finish")
        time.sleep(10)
        busy = machine_busy()
    return busy


class Child:
    """One finished process: its JSON line, wall seconds, peak RSS (bytes), CPU seconds, the
    share of the machine's CPU time that *other* processes used while it ran, and the bytes it
    read from the block device (``ru_inblock``: what the page cache did not hold)."""

    def __init__(
        self, doc: dict, wall: float, rss: int, cpu: float, contention: float, disk: int
    ) -> None:
        self.doc, self.wall, self.rss, self.cpu, self.contention = doc, wall, rss, cpu, contention
        self.disk = disk


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> Child:
    tick = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy0, total0 = cpu_jiffies()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        busy1, total1 = cpu_jiffies()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr}{stdout}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{' '.join(cmd)}: no JSON timings on stdout:\n{stdout}{stderr}")
    cpu = usage.ru_utime + usage.ru_stime
    foreign = max((busy1 - busy0) / tick - cpu, 0.0)
    contention = foreign / max((total1 - total0) / tick, 1e-9)
    # ru_inblock counts 512-byte blocks (Linux), whatever the file system's block size.
    disk = usage.ru_inblock * 512
    return Child(json.loads(lines[-1]), wall, usage.ru_maxrss * 1024, cpu, contention, disk)


def load_seconds(doc: dict) -> float:
    """Our start-up: ONNX Runtime, the tokenizer and the sessions. Sessions created together
    load in parallel, so their wall time (``load sessions``) counts, not the sum of the
    per-graph times; binaries before parallel loading report only the per-graph times."""
    if "load sessions" in doc:
        return (
            doc["load sessions"] + doc.get("load onnxruntime", 0.0) + doc.get("load tokenizer", 0.0)
        )
    return sum(v for k, v in doc.items() if k.startswith("load "))


def ours_stages(doc: dict) -> dict[str, float]:
    steps = doc.get("denoise step", [])
    return {
        "load": load_seconds(doc),
        "concept": doc["preprocess"] + doc["encode concept"],
        "text": doc["encode text"],
        "denoise step": statistics.median(steps),
        "denoise": doc["denoise"],
        "decode": doc["decode"],
        "total": doc["total"],
    }


def reference_stages(doc: dict) -> dict[str, float]:
    return {
        "load": doc["load"],
        "concept": doc["preprocess"] + doc["encode concept"],
        "text": doc["encode text"],
        "denoise step": statistics.median(doc["denoise step"]),
        "denoise": doc["denoise"],
        "decode": doc["decode"],
        "total": doc["total"],
        "import": doc["import"],
    }


def cpu_model() -> str:
    """The CPU's model name, family and model (``/proc/cpuinfo``): what a row's machine was."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
            if not line.strip():
                break
    except OSError:
        return "unknown CPU"
    flags = set(info.get("flags", "").split())
    extra = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')}, "
        f"model {info.get('model', '?')}; {' '.join(extra) or 'no AVX-512'})"
    )


def machine() -> str:
    cpu = cpu_model()
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        mem_gb = int(mem) / 2**20
    except OSError:
        mem_gb = 0.0
    return f"{cpu}, {os.cpu_count()} CPUs, {mem_gb:.0f} GiB RAM, no GPU ({platform.platform()})"


def gemm_rates(max_contention: float, retries: int, timeout: float) -> dict[str, dict]:
    """The fp32 GEMM rate through ONNX Runtime and torch (``bench/roofline.py``, one process
    each, default threads as each side runs), repeated like a benchmark run when other
    processes took more than ``max_contention`` of the CPUs meanwhile."""
    out = {}
    for side in ("ort", "torch"):
        cmd = [sys.executable, str(ROOT / "bench/roofline.py"), "--side", side]
        for attempt in range(1, retries + 2):
            wait_idle(max_contention, timeout)
            child = run_child(cmd)
            if child.contention <= max_contention or attempt > retries:
                break
            log(f"GEMM rate {side}: other processes took {child.contention:.0%}; again")
        out[side] = child.doc | {"contention": child.contention}
    log(
        f"GEMM rate: ONNX Runtime {out['ort']['rate']:.0f} GFLOP/s, "
        f"torch {out['torch']['rate']:.0f} GFLOP/s"
    )
    return out


def stage_flops(bundle: Path, upstream: Path, height: int, width: int) -> dict[str, dict]:
    """FLOPs per stage of both sides (``bench/flops.py``, in a child process: it reads every
    graph)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flops.json"
        cmd = [sys.executable, str(ROOT / "bench/flops.py"), "--bundle", str(bundle)]
        cmd += ["--upstream", str(upstream), "--height", str(height), "--width", str(width)]
        subprocess.run(cmd + ["--json", str(out)], cwd=ROOT, check=True, capture_output=True)
        return json.loads(out.read_text())


def fmt(stage: str, value: float) -> str:
    if stage == "peak RSS":
        return f"{value / 2**30:.2f} GiB"
    if stage == "contention":
        return f"{value:.0%}"
    if stage == "disk read":
        return f"{value / 2**20:.0f} MiB"
    return f"{value:.3f} s"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--bundle", help="bundle directory (default: per --size)")
    p.add_argument("--upstream", help="upstream-format model directory (default: per --size)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    p.add_argument("--steps", type=int)
    p.add_argument(
        "--scheduler", default="lms", help="sampler of both sides (a runtime scheduler name)"
    )
    p.add_argument(
        "--reference-scheduler",
        help="the reference's sampler, if not --scheduler (e.g. lms: a fast preset of ours "
        "against the official settings; then the ratio compares different computations)",
    )
    p.add_argument("--reference-steps", type=int, help="the reference's steps, if not --steps")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--threads", type=int, help="intra-op threads for both (default: each's own)")
    p.add_argument(
        "--max-contention",
        type=float,
        default=0.1,
        help="a run during which other processes used more than this share of the CPUs is "
        "repeated (and each run waits until the machine is this idle); default 0.1",
    )
    p.add_argument("--retries", type=int, default=3, help="repeats of a contended run (3)")
    p.add_argument(
        "--idle-timeout", type=float, default=900, help="longest wait for an idle machine (s)"
    )
    p.add_argument("--no-build", action="store_true", help="use the existing release binary")
    p.add_argument("--binary", help="benchmark this elite-ort binary (implies --no-build)")
    p.add_argument(
        "--cache-dir",
        default="scratch/bench/cache",
        help="the runtime's cache (ELITE_ORT_CACHE_DIR), emptied first so that the warm-up run "
        "is a first start; default scratch/bench/cache",
    )
    p.add_argument(
        "--keep-cache",
        action="store_true",
        help="do not empty the runtime's cache: with --warmup 0, every counted run is a later "
        "start when an earlier benchmark of the same binary and bundle filled the cache",
    )
    p.add_argument("--label", default="", help="what this run measures (for the results table)")
    p.add_argument(
        "--ours-arg",
        action="append",
        default=[],
        help="extra argument for `elite-ort run` (repeatable; e.g. --ours-arg=--no-verify)",
    )
    p.add_argument("--json", help="raw samples file (default: scratch/bench/<time>-<size>.json)")
    args = p.parse_args()

    cfg = SIZES[args.size]
    bundle = ROOT / (args.bundle or str(cfg["bundle"]))
    upstream = ROOT / (args.upstream or str(cfg["upstream"]))
    steps = args.steps or int(str(cfg["steps"]))
    height = args.height or int(str(cfg["height"]))
    width = args.width or int(str(cfg["width"]))
    if not (bundle / "elite.json").is_file():
        raise SystemExit(f"{bundle} is not a bundle (see bench/README.md)")
    binary = Path(args.binary).resolve() if args.binary else cargo_binary(not args.no_build)
    cache = ROOT / args.cache_dir
    if cache.exists() and not args.keep_cache:
        shutil.rmtree(cache)
    ours_env = dict(os.environ, ELITE_ORT_CACHE_DIR=str(cache))
    ensure_upstream(args.size, upstream)

    outdir = Path(tempfile.mkdtemp(prefix="elite-bench-"))
    common = ["--prompt", PROMPT, "--height", str(height)]
    common += ["--width", str(width), "--seed", "42", "--guidance", "5"]
    ref_scheduler = args.reference_scheduler or args.scheduler
    ref_steps = args.reference_steps or steps
    ours_cmd = [str(binary), "run", "--bundle", str(bundle), "--image", str(IMAGE)]
    ours_cmd += ["--mask", str(MASK), *common, "--lambda", "0.8", "--quiet", "--force"]
    ours_cmd += ["--steps", str(steps), "--scheduler", args.scheduler]
    ours_cmd += ["--timings", "json", "--out", str(outdir / "ours.png"), *args.ours_arg]
    ref_cmd = [sys.executable, str(ROOT / "bench/reference_run.py"), "--upstream", str(upstream)]
    ref_cmd += ["--size", args.size, "--image", str(IMAGE), "--mask", str(MASK), *common]
    ref_cmd += ["--steps", str(ref_steps), "--scheduler", ref_scheduler]
    ref_cmd += ["--lam", "0.8", "--out", str(outdir / "reference.png")]
    if args.threads:
        ours_cmd += ["--threads", str(args.threads)]
        ref_cmd += ["--threads", str(args.threads)]

    settings = f"{width}x{height}, {steps} steps, guidance 5, λ 0.8, seed 42, batch 1"
    settings += f", scheduler {args.scheduler}"
    if (ref_scheduler, ref_steps) != (args.scheduler, steps):
        settings += (
            f" (reference: {ref_scheduler}, {ref_steps} steps — different computations, so the "
            "ratio is a fast preset against the official settings, not a same-run ratio)"
        )
    log(f"{args.size}: {shown(bundle)} vs {shown(upstream)}; {settings}")
    log("counting FLOPs (bench/flops.py)")
    flops = stage_flops(bundle, upstream, height, width)
    rates_before = gemm_rates(args.max_contention, args.retries, args.idle_timeout)
    samples: dict[str, list[dict]] = {"ours": [], "reference": []}
    first: dict[str, dict] = {}
    raw: dict[str, list[dict]] = {"ours": [], "reference": []}
    total = args.warmup + args.reps
    for rep in range(total):
        order = ["ours", "reference"] if rep % 2 == 0 else ["reference", "ours"]
        tag = "warm-up" if rep < args.warmup else f"rep {rep - args.warmup + 1}/{args.reps}"
        for who in order:
            for attempt in range(1, args.retries + 2):
                wait_idle(args.max_contention, args.idle_timeout)
                if rep < args.warmup and who == "ours" and cache.exists() and not args.keep_cache:
                    shutil.rmtree(cache)  # the warm-up is a first start, also when repeated
                if who == "ours":
                    child = run_child(ours_cmd, ours_env)
                else:
                    child = run_child(ref_cmd)
                if child.contention <= args.max_contention or attempt > args.retries:
                    break
                log(f"{tag} {who}: other processes took {child.contention:.0%} of the CPUs; again")
            doc = child.doc
            stages = ours_stages(doc) if who == "ours" else reference_stages(doc)
            stages |= {
                "end to end": child.wall,
                "peak RSS": float(child.rss),
                "CPU time": child.cpu,
                "contention": child.contention,
                "disk read": float(child.disk),
            }
            log(f"{tag} {who:>9}: " + ", ".join(f"{k} {fmt(k, v)}" for k, v in stages.items()))
            if rep >= args.warmup:
                samples[who].append(stages)
                raw[who].append(
                    doc | {"wall": child.wall, "max_rss": child.rss, "disk_read": child.disk}
                )
            elif rep == 0:
                first[who] = stages

    rates_after = gemm_rates(args.max_contention, args.retries, args.idle_timeout)
    rate = {
        side: max(rates_before[side]["rate"], rates_after[side]["rate"]) for side in rates_before
    }
    med = {
        who: {k: statistics.median(s[k] for s in samples[who]) for k in samples[who][0]}
        for who in samples
    }
    date = dt.date.today().isoformat()
    print(f"## {args.size} bundle, {date}{' — ' + args.label if args.label else ''}\n")
    print(f"- settings: {settings}" + (" (reduced for CPU time)" if args.size == "full" else ""))
    print(f"- machine: {machine()}")
    worst = max(s["contention"] for who in samples for s in samples[who])
    print(
        f"- medians of {args.reps} alternating repetitions after {args.warmup} warm-up; other "
        f"processes used at most {worst:.0%} of the CPUs during a counted run"
    )
    print(
        "- read from the disk during a counted run (the page cache did not hold it): ours "
        + ", ".join(fmt("disk read", s["disk read"]) for s in samples["ours"])
        + "; reference "
        + ", ".join(fmt("disk read", s["disk read"]) for s in samples["reference"])
    )
    print(f"- reference: torch {raw['reference'][0]['threads']} threads, fp32, eager")
    if "ours" in first:
        f = first["ours"]
        print(
            f"- first start of ours (empty cache, warm-up run): load {f['load']:.3f} s, "
            f"end to end {f['end to end']:.3f} s; the table is later starts"
        )
    print(f"- command: `{' '.join(['.venv/bin/python', 'bench/run.py', *sys.argv[1:]])}`\n")
    print("| stage | ours | reference | ours / ref | target |")
    print("|---|---:|---:|---:|---:|")
    for stage in ROWS:
        o, r = med["ours"][stage], med["reference"][stage]
        target = f"≤ {TARGETS[stage]}" if stage in TARGETS else ""
        print(f"| {stage} | {fmt(stage, o)} | {fmt(stage, r)} | {o / r:.2f} | {target} |")

    shapes = ", ".join(rates_before["ort"]["shapes"])
    print(
        f"\nRoofline. fp32 GEMM rate (bench/roofline.py: one-node MatMul, {shapes}; before / "
        f"after the runs): ONNX Runtime {rates_before['ort']['rate']:.0f} / "
        f"{rates_after['ort']['rate']:.0f} GFLOP/s, torch {rates_before['torch']['rate']:.0f} / "
        f"{rates_after['torch']['rate']:.0f} GFLOP/s. Work per stage: bench/flops.py "
        f"(GFLOP = 10⁹ FLOPs = 2 · MAC of MatMul, Gemm, Conv, attention). Fraction = achieved "
        f"GFLOP/s / that side's GEMM rate (the higher measurement).\n"
    )
    print(
        "| stage | GFLOP ours | GFLOP ref | ours GFLOP/s | of ORT GEMM | ref GFLOP/s | of torch GEMM |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    roofline: dict[str, dict[str, float]] = {}
    for stage, work in flops.items():
        o = work["ours"] / med["ours"][stage] / 1e9
        r = work["reference"] / med["reference"][stage] / 1e9
        roofline[stage] = {
            "ours GFLOP/s": o,
            "ours fraction": o / rate["ort"],
            "reference GFLOP/s": r,
            "reference fraction": r / rate["torch"],
        }
        print(
            f"| {stage} | {work['ours'] / 1e9:.1f} | {work['reference'] / 1e9:.1f} | {o:.0f} | "
            f"{o / rate['ort']:.2f} | {r:.0f} | {r / rate['torch']:.2f} |"
        )

    path = Path(args.json) if args.json else ROOT / "scratch/bench"
    if not args.json:
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{args.size}.json"
    record = {
        "date": date,
        "size": args.size,
        "label": args.label,
        "settings": settings,
        "machine": machine(),
        "command": sys.argv,
        "ours_cmd": ours_cmd,
        "ref_cmd": ref_cmd,
        "medians": med,
        "flops": flops,
        "gemm_rate": {"before": rates_before, "after": rates_after},
        "roofline": roofline,
        "first_start": first,
        "binary": str(binary),
        "samples": samples,
        "raw": raw,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"raw samples: {path}")


if __name__ == "__main__":
    main()
