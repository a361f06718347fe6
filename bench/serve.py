"""The server under load: throughput and latency with and without step-level batching.

    .venv/bin/python bench/serve.py --size tiny
    .venv/bin/python bench/serve.py --size full          # scratch/full (export full-random)

For each ``--max-batch`` (2 = one job per UNet call, i.e. unbatched; 8; 16) it starts
``elite-ort serve`` (release build) on loopback, uploads one concept, and sends the same
``--requests`` generations (distinct seeds) at concurrency 1, 4 and 16: images per minute,
p50/p95 end-to-end latency (request sent → PNG received), and at concurrency 1 the server's
overhead: latency against the engine's own time for the job (queue + text + denoise + decode,
from the response's timings). The same generations as sequential ``elite-ort run`` processes
give the baseline. Finally the server's resident memory after 20 and after 200 small requests
(64², one step), which shows whether anything grows per request.

The machine's idleness is waited for before each configuration (see run.py); other load
during a configuration is reported as contention.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # noqa: E402  (bench/run.py: the shared process harness)

SIZES: dict[str, dict[str, object]] = {
    "tiny": {"bundle": "onnx/tiny", "steps": 20, "requests": 32},
    "full": {"bundle": "scratch/full/bundle", "steps": 4, "requests": 16},
}
PROMPT = "a photo of a S"


class Server:
    def __init__(self, binary: Path, bundle: Path, cache: Path, extra: list[str]) -> None:
        self.store = tempfile.TemporaryDirectory()
        cmd = [str(binary), "serve", "--bundle", str(bundle), "--listen", "127.0.0.1:0"]
        cmd += ["--concept-dir", self.store.name, "--cache-dir", str(cache), "--queue", "1024"]
        self.proc = subprocess.Popen(
            cmd + extra, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        self.base = ""
        for line in self.proc.stdout:
            if line.startswith("listening on "):
                self.base = line.strip().removeprefix("listening on ")
            if line.startswith("ready after"):
                break
        if not self.base:
            raise SystemExit("the server did not start")

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.base + path,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=3600) as response:
            return json.load(response)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=300)
        self.store.cleanup()


def generate(server: Server, concept: str, settings: dict, seed: int) -> tuple[float, float]:
    """(end-to-end latency, the engine's time for the job), seconds."""
    start = time.perf_counter()
    result = server.post(
        "/v1/generate", {**settings, "prompt": PROMPT, "concept": concept, "seed": seed}
    )
    latency = time.perf_counter() - start
    t = result["timings"]
    engine = t["queue"] + t["encode text"] + t["denoise"] + t["decode"]
    return latency, engine


def load(server: Server, concept: str, settings: dict, seeds: list[int], c: int) -> dict:
    busy0, total0 = harness.cpu_jiffies()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=c) as pool:
        results = list(pool.map(lambda s: generate(server, concept, settings, s), seeds))
    wall = time.perf_counter() - start
    busy1, total1 = harness.cpu_jiffies()
    latencies = sorted(r[0] for r in results)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return {
        "images/min": 60 * len(seeds) / wall,
        "p50": statistics.median(latencies),
        "p95": p95,
        "overhead": statistics.median(r[0] / r[1] for r in results),
        "busy": (busy1 - busy0) / max(total1 - total0, 1),
    }


def upload(server: Server) -> str:
    body = {
        "image": base64.b64encode(harness.IMAGE.read_bytes()).decode(),
        "mask": base64.b64encode(harness.MASK.read_bytes()).decode(),
    }
    return str(server.post("/v1/concepts", body)["id"])


def sequential_cli(
    binary: Path, bundle: Path, cache: Path, settings: dict, seeds: list[int], extra: list[str]
) -> float:
    """Images per minute of the same generations as separate CLI processes."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for seed in seeds:
            cmd = [str(binary), "run", "--bundle", str(bundle), "--prompt", PROMPT]
            cmd += ["--image", str(harness.IMAGE), "--mask", str(harness.MASK)]
            cmd += ["--cache-dir", str(cache), "--quiet", "--force", "--seed", str(seed)]
            cmd += ["--out", f"{out}/o.png", *extra]
            for key in ("steps", "height", "width"):
                cmd += [f"--{key}", str(settings[key])]
            subprocess.run(cmd, check=True)
    return 60 * len(seeds) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--bundle")
    p.add_argument("--binary", help="elite-ort binary (default: cargo's release build)")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--requests", type=int, help="generations per concurrency level")
    p.add_argument("--steps", type=int)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batches", default="2,8,16", help="--max-batch values (2 = unbatched)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        help="extra engine flag for the server and the CLI runs, e.g. --arg=--device --arg=cuda",
    )
    p.add_argument("--max-contention", type=float, default=0.1)
    p.add_argument("--idle-timeout", type=float, default=600.0)
    p.add_argument("--no-memory", action="store_true", help="skip the 200-request RSS check")
    args = p.parse_args()
    spec = SIZES[args.size]
    bundle = Path(args.bundle or str(spec["bundle"]))
    if not bundle.is_absolute():
        bundle = harness.ROOT / bundle
    binary = Path(args.binary) if args.binary else harness.cargo_binary(not args.no_build)
    cache = harness.ROOT / "scratch/bench/cache"
    cache.mkdir(parents=True, exist_ok=True)
    steps = args.steps or int(str(spec["steps"]))
    count = args.requests or int(str(spec["requests"]))
    settings = {"steps": steps, "height": args.image_size, "width": args.image_size}
    seeds = list(range(1, count + 1))
    levels = [int(c) for c in args.concurrency.split(",")]

    lines = [
        f"## Serving, {args.size} ({harness.shown(bundle)}), {dt.date.today()}",
        "",
        f"Machine: {harness.machine()}.",
        f"Command: `.venv/bin/python bench/serve.py {' '.join(sys.argv[1:])}`; {count} "
        f"generations per row, {args.image_size}², {steps} steps.",
        "",
        "| server | concurrency | images/min | p50 s | p95 s | latency / engine time | CPU busy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    harness.wait_idle(args.max_contention, args.idle_timeout)
    cli = sequential_cli(binary, bundle, cache, settings, seeds[: min(count, 8)], args.arg)
    lines.append(f"| sequential `elite-ort run` processes | 1 | {cli:.2f} | | | | |")
    for batch in [int(b) for b in args.batches.split(",")]:
        harness.wait_idle(args.max_contention, args.idle_timeout)
        server = Server(binary, bundle, cache, ["--max-batch", str(batch), *args.arg])
        try:
            concept = upload(server)
            generate(server, concept, settings, 0)  # warm (not counted)
            for c in levels:
                r = load(server, concept, settings, seeds, c)
                label = "unbatched (`--max-batch 2`)" if batch == 2 else f"`--max-batch {batch}`"
                lines.append(
                    f"| {label} | {c} | {r['images/min']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} "
                    f"| {r['overhead']:.3f} | {r['busy']:.0%} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
        finally:
            server.stop()
    if not args.no_memory:
        server = Server(binary, bundle, cache, args.arg)
        try:
            concept = upload(server)
            small = {"steps": 1, "height": 64, "width": 64}
            load(server, concept, small, list(range(20)), 4)
            after20 = server.rss()
            load(server, concept, small, list(range(20, 200)), 4)
            after200 = server.rss()
        finally:
            server.stop()
        lines += [
            "",
            f"Resident memory after 20 requests {after20 / 2**20:.0f} MiB, after 200 "
            f"{after200 / 2**20:.0f} MiB ({after200 / after20:.3f}×; 64², one step, concurrency 4).",
        ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
