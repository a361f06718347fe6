"""The server under load: throughput and latency with and without step-level batching.

    .venv/bin/python bench/serve.py --size tiny
    .venv/bin/python bench/serve.py --size full          # scratch/full (export full-random)

For each ``--max-batch`` (2 = one job per UNet call, i.e. unbatched; 8; 16; each with the
default adaptive call sizing, or ``--call-sizing fixed`` for an entry like ``8f``) it starts
``elite-ort serve`` (release build) on loopback, uploads one concept, and sends the same
``--requests`` generations (distinct seeds) at concurrency 1, 4 and 16: images per minute,
p50/p95 end-to-end latency (request sent → PNG received), and at concurrency 1 the server's
overhead: latency against the engine's own time for the job (queue + text + denoise + decode,
from the response's timings). The same generations as sequential ``elite-ort run`` processes
give the baseline. Finally the server's resident memory after 20 and after 200 small requests
(64², one step), which shows whether anything grows per request.

The machine's idleness is waited for before each configuration (see run.py); other load
during a configuration is reported as contention.

``--interleave 2,2,16`` is the A/B (and A/A) form of the batched-against-unbatched question,
for differences smaller than the host's drift: all the listed servers run at once (an idle one
sleeps in its command channel and costs nothing), each gets ``--warmup`` generations at the
highest concurrency first (not counted: allocations, and the adaptive call sizing's first calls
at every candidate size, whose price is reported apart), then ``--rounds`` rounds send the same
``--requests`` generations to each server in turn, the order rotating by one every round so
that every server takes every position equally often. The report gives each server's images
per minute per round, and each server's ratio to the first one's in the same round: mean,
standard deviation and standard error over the rounds. A repeated first entry (``2,2,…``)
measures the pairing noise in the same run; with two or more unbatched entries every other
server is also paired with their mean. ``other ms / image`` is each server's wall time per
image outside UNet calls.
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

    def metrics(self) -> dict[str, float]:
        """The server's unlabelled Prometheus samples (name → value)."""
        with urllib.request.urlopen(self.base + "/metrics", timeout=60) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
                samples[parts[0]] = float(parts[1])
        return samples

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
    before = server.metrics()
    busy0, total0 = harness.cpu_jiffies()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=c) as pool:
        results = list(pool.map(lambda s: generate(server, concept, settings, s), seeds))
    wall = time.perf_counter() - start
    busy1, total1 = harness.cpu_jiffies()
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    calls, rows = delta("elite_unet_batch_rows_count"), delta("elite_unet_batch_rows_sum")
    latencies = sorted(r[0] for r in results)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return {
        "images/min": 60 * len(seeds) / wall,
        "p50": statistics.median(latencies),
        "p95": p95,
        "overhead": statistics.median(r[0] / r[1] for r in results),
        "busy": (busy1 - busy0) / max(total1 - total0, 1),
        # What the calls held and cost: the call sizing's choice and its price per row.
        "rows/call": rows / max(calls, 1),
        "ms/row": 1000 * delta("elite_unet_call_seconds_sum") / max(rows, 1),
        # The wall time per image that was not UNet time: text encoding, decode, HTTP and PNG
        # work, and the model thread waiting for them; where a difference in throughput is
        # not in the UNet calls, it is here.
        "other ms/image": 1000 * (wall - delta("elite_unet_call_seconds_sum")) / len(seeds),
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


def label_of(entry: str) -> tuple[list[str], str]:
    """The server flags of a ``--batches`` entry (``8``, ``8f``) and its label in a table."""
    batch, fixed = int(entry.rstrip("f")), entry.endswith("f")
    flags = ["--max-batch", str(batch)] + (["--call-sizing", "fixed"] if fixed else [])
    if batch == 2:
        return flags, "unbatched (`--max-batch 2`)"
    return flags, f"`{' '.join(flags)}`" + ("" if fixed else " (adaptive)")


def interleaved(
    binary: Path,
    bundle: Path,
    cache: Path,
    entries: list[str],
    extra: list[str],
    settings: dict,
    seeds: list[int],
    c: int,
    warmup: int,
    rounds: int,
) -> list[str]:
    """Report lines of the ``--interleave`` form (see the module documentation)."""
    names = [chr(ord("A") + i) for i in range(len(entries))]
    labels = [f"{n}: {label_of(entry)[1]}" for n, entry in zip(names, entries)]
    servers: list[Server] = []
    try:
        for entry in entries:
            servers.append(Server(binary, bundle, cache, [*label_of(entry)[0], *extra]))
        concepts = [upload(server) for server in servers]
        lines = [
            "| server | warm-up images/min | warm-up rows / UNet call | warm-up UNet ms / row |",
            "|---|---:|---:|---:|",
        ]
        for server, concept, label in zip(servers, concepts, labels):
            r = load(server, concept, settings, list(range(10_000, 10_000 + warmup)), c)
            lines.append(
                f"| {label} | {r['images/min']:.2f} | {r['rows/call']:.2f} | {r['ms/row']:.2f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
        per_round: list[list[dict]] = []
        orders: list[str] = []
        for k in range(rounds):
            order = [(k + j) % len(servers) for j in range(len(servers))]
            orders.append("".join(names[i] for i in order))
            by_server: dict[int, dict] = {}
            for i in order:
                by_server[i] = load(servers[i], concepts[i], settings, seeds, c)
            per_round.append([by_server[i] for i in range(len(servers))])
            print(
                f"round {k + 1}/{rounds} (order {orders[-1]}): "
                + ", ".join(f"{r['images/min']:.2f}" for r in per_round[-1]),
                file=sys.stderr,
                flush=True,
            )
    finally:
        for server in servers:
            server.stop()
    lines += [
        "",
        "| round | order | "
        + " | ".join(f"{n} images/min" for n in names)
        + " | "
        + " | ".join(f"{n} / A" for n in names[1:])
        + " |",
        "|---:|---|" + "---:|" * (2 * len(names) - 1),
    ]
    for k, (measured, rotation) in enumerate(zip(per_round, orders)):
        speeds = [r["images/min"] for r in measured]
        lines.append(
            f"| {k + 1} | {rotation} | "
            + " | ".join(f"{v:.2f}" for v in speeds)
            + " | "
            + " | ".join(f"{v / speeds[0]:.4f}" for v in speeds[1:])
            + " |"
        )
    lines += [
        "",
        "| server | images/min (mean) | / A: mean | sd | standard error | rows / UNet call | "
        "UNet ms / row | other ms / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, label in enumerate(labels):
        speeds = [results[i]["images/min"] for results in per_round]
        rows = statistics.mean(results[i]["rows/call"] for results in per_round)
        ms = statistics.mean(results[i]["ms/row"] for results in per_round)
        other = statistics.mean(results[i]["other ms/image"] for results in per_round)
        costs = f"{rows:.3f} | {ms:.2f} | {other:.1f}"
        if i == 0:
            lines.append(f"| {label} | {statistics.mean(speeds):.2f} | | | | {costs} |")
            continue
        ratios = [results[i]["images/min"] / results[0]["images/min"] for results in per_round]
        lines.append(f"| {label} | {statistics.mean(speeds):.2f} | {summary(ratios)} | {costs} |")
    unbatched = [i for i, entry in enumerate(entries) if entry.rstrip("f") == "2"]
    if len(unbatched) > 1:
        # Against the mean of the unbatched servers of the same round: the pairing that uses
        # every unbatched measurement, so its noise is below one A/A pairing's.
        lines += ["", "| server | / unbatched mean of the round: mean | sd | standard error |"]
        lines.append("|---|---:|---:|---:|")
        for i, label in enumerate(labels):
            if i in unbatched:
                continue
            ratios = [
                results[i]["images/min"]
                / statistics.mean(results[j]["images/min"] for j in unbatched)
                for results in per_round
            ]
            lines.append(f"| {label} | {summary(ratios)} |")
    return lines


def summary(ratios: list[float]) -> str:
    """Mean, standard deviation and standard error of per-round ratios, as table cells."""
    sd = statistics.stdev(ratios) if len(ratios) > 1 else float("nan")
    return f"{statistics.mean(ratios):.4f} | {sd:.4f} | {sd / len(ratios) ** 0.5:.4f}"


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
    p.add_argument(
        "--batches",
        default="2,8,16",
        help="--max-batch values (2 = unbatched); a trailing f (8f) = --call-sizing fixed",
    )
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
    p.add_argument("--no-cli", action="store_true", help="skip the sequential CLI baseline")
    p.add_argument(
        "--interleave",
        help="--batches entries run at once and measured round by round (see the docstring)",
    )
    p.add_argument("--rounds", type=int, default=8, help="rounds of --interleave")
    p.add_argument(
        "--warmup", type=int, default=32, help="uncounted generations per --interleave server"
    )
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
    ]
    cli = None
    if not args.no_cli:
        harness.wait_idle(args.max_contention, args.idle_timeout)
        cli = sequential_cli(binary, bundle, cache, settings, seeds[: min(count, 8)], args.arg)
    if args.interleave:
        harness.wait_idle(args.max_contention, args.idle_timeout)
        entries = args.interleave.split(",")
        lines.append(
            f"Interleaved: {len(entries)} servers at once, {args.warmup} warm-up generations "
            f"each, {args.rounds} rounds at concurrency {max(levels)}."
        )
        if cli is not None:
            lines.append(f"Sequential `elite-ort run` processes: {cli:.2f} images/min.")
        lines.append("")
        lines += interleaved(
            binary,
            bundle,
            cache,
            entries,
            args.arg,
            settings,
            seeds,
            max(levels),
            args.warmup,
            args.rounds,
        )
        print("\n".join(lines))
        return
    lines += [
        "| server | concurrency | images/min | p50 s | p95 s | latency / engine time | CPU busy "
        "| rows / UNet call | UNet ms / row |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if cli is not None:
        lines.append(f"| sequential `elite-ort run` processes | 1 | {cli:.2f} | | | | | | |")
    for entry in args.batches.split(","):
        harness.wait_idle(args.max_contention, args.idle_timeout)
        flags, label = label_of(entry)
        server = Server(binary, bundle, cache, [*flags, *args.arg])
        try:
            concept = upload(server)
            generate(server, concept, settings, 0)  # warm (not counted)
            for c in levels:
                r = load(server, concept, settings, seeds, c)
                lines.append(
                    f"| {label} | {c} | {r['images/min']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} "
                    f"| {r['overhead']:.3f} | {r['busy']:.0%} | {r['rows/call']:.2f} "
                    f"| {r['ms/row']:.2f} |"
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
