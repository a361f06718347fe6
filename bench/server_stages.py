"""A resident server's per-request stages, binary against binary: readiness, concept upload,
text encoding, decode.

    .venv/bin/python bench/server_stages.py --size full --binary OLD --binary NEW

For each ``--binary`` in turn (``--pairs`` rounds, alternating, so that the machine's drift falls
on every binary) it starts ``elite-ort serve`` on loopback and measures: the time to readiness
(the server's own "ready after" line: sessions created and warmed up), ``--uploads`` concept
uploads of distinct images (the benchmark image with one pixel changed, so that each is a real
CLIP pass and not a store hit; client-side latency), and ``--requests`` generations one at a
time (the response's ``encode text`` and ``decode`` timings). Then the server's resident
memory. Medians per binary over all rounds.

These are the stages that run once per upload or request, which a server repeats for its whole
life: whether their graphs are pre-packed is what this measures (issue 14).
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # noqa: E402  (bench/run.py: the shared process harness)
import serve  # noqa: E402  (bench/serve.py: the server process and its requests)


def distinct_png(i: int) -> bytes:
    """The benchmark image with pixel (0, 0) set from `i`: a different sha256 per `i`."""
    with Image.open(harness.IMAGE) as image:
        rgb = image.convert("RGB")
    rgb.putpixel((0, 0), (i % 256, (i // 256) % 256, 7))
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


def measure(server: serve.Server, first: int, uploads: int, requests: int) -> dict:
    mask = base64.b64encode(harness.MASK.read_bytes()).decode()
    upload_s = []
    concept = ""
    for i in range(first, first + uploads):
        body = {"image": base64.b64encode(distinct_png(i)).decode(), "mask": mask}
        start = time.perf_counter()
        reply = server.post("/v1/concepts", body)
        upload_s.append(time.perf_counter() - start)
        if not reply.get("created", True):
            raise SystemExit("an upload was a store hit: the images are not distinct")
        concept = str(reply["id"])
    text, decode = [], []
    settings = {"steps": 1, "height": 256, "width": 256}
    for seed in range(requests):
        result = server.post(
            "/v1/generate", {**settings, "prompt": serve.PROMPT, "concept": concept, "seed": seed}
        )
        text.append(result["timings"]["encode text"])
        decode.append(result["timings"]["decode"])
    return {"upload": upload_s, "text": text, "decode": decode, "rss": [server.rss()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(serve.SIZES), default="full")
    p.add_argument("--bundle")
    p.add_argument("--binary", action="append", required=True, help="repeat: binaries to compare")
    p.add_argument("--pairs", type=int, default=3, help="rounds over the binaries")
    p.add_argument("--uploads", type=int, default=4)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-contention", type=float, default=0.05)
    p.add_argument("--idle-timeout", type=float, default=600.0)
    args = p.parse_args()
    bundle = Path(args.bundle or str(serve.SIZES[args.size]["bundle"]))
    cache = harness.ROOT / "scratch/bench/cache"
    results: dict[str, dict[str, list[float]]] = {
        b: {"ready": [], "upload": [], "text": [], "decode": [], "rss": []} for b in args.binary
    }
    counter = 0
    for round_ in range(args.pairs):
        for binary in args.binary:
            harness.wait_idle(args.max_contention, args.idle_timeout)
            start = time.perf_counter()
            server = serve.Server(Path(binary), bundle, cache, [])
            results[binary]["ready"].append(time.perf_counter() - start)
            try:
                got = measure(server, counter, args.uploads, args.requests)
            finally:
                server.stop()
            counter += args.uploads
            for key, values in got.items():
                results[binary][key] += values
            print(
                f"[server_stages] round {round_ + 1} {binary}: ready "
                f"{results[binary]['ready'][-1]:.2f} s, upload "
                f"{statistics.median(got['upload']):.3f} s, text "
                f"{statistics.median(got['text']):.3f} s, decode "
                f"{statistics.median(got['decode']):.3f} s",
                file=sys.stderr,
                flush=True,
            )
    print(f"## Server stages, {args.size} ({harness.shown(bundle)})\n")
    print(f"Machine: {harness.machine()}.")
    print(f"Command: `.venv/bin/python bench/server_stages.py {' '.join(sys.argv[1:])}`.\n")
    print("| binary | ready s | concept upload s | encode text s | decode s | RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for binary, r in results.items():
        print(
            f"| `{binary}` | {statistics.median(r['ready']):.2f} "
            f"| {statistics.median(r['upload']):.3f} | {statistics.median(r['text']):.3f} "
            f"| {statistics.median(r['decode']):.3f} | {statistics.median(r['rss']) / 2**30:.2f} |"
        )


if __name__ == "__main__":
    main()
