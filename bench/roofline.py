"""The machine's fp32 GEMM rate, through ONNX Runtime and through torch: the yardstick that
``bench/run.py`` divides each stage's achieved GFLOP/s by.

    .venv/bin/python bench/roofline.py --side ort          # one JSON line on stdout
    .venv/bin/python bench/roofline.py --side torch
    .venv/bin/python bench/roofline.py --side torch --dtype bf16   # torch's bf16 GEMM (AMX/AVX512-BF16)

ONNX Runtime: a one-node ``MatMul`` graph ``y = a · W`` with ``W`` a constant initializer (as the
UNet's weights are, so ONNX Runtime pre-packs it), CPU provider, default intra-op threads (the
runtime's default), for each of ``SHAPES``. torch: ``torch.matmul`` of the same shapes with
torch's default threads (the reference's). Each shape: warm-up, then repetitions for about
``--seconds``; the time is the median repetition. The rate is the aggregate over the shapes
(their FLOPs summed over their median times summed), so no single shape's luck decides it.

The shapes (M, K, N) are the GEMMs of SD's UNet at 256², batch 2 (2 × 32² = 2048 rows at level
1, 512 at level 2): a 3×3 convolution of level 1 as im2col (K = 320 · 9), the GEGLU projection
(320 → 2560), a level-2 convolution (K = 640 · 9), and the 2048³ cube other reports quote.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

SHAPES: list[tuple[int, int, int]] = [
    (2048, 2880, 320),
    (2048, 320, 2560),
    (512, 5760, 640),
    (2048, 2048, 2048),
]


def _time(fn: Callable[[], object], seconds: float) -> float:
    """Median seconds of ``fn`` over repetitions filling about ``seconds`` (after 2 warm-ups)."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ort_rates(
    seconds: float,
    threads: int | None = None,
    shapes: list[tuple[int, int, int]] = SHAPES,
) -> dict[str, float]:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    for m, k, n in shapes:
        w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "w"], ["y"])],
            "gemm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
            [w],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        a = rng.standard_normal((m, k), dtype=np.float32)
        seconds_per = _time(lambda: session.run(None, {"a": a}), seconds)
        out[f"{m}x{k}x{n}"] = seconds_per
    return out


def torch_rates(
    seconds: float,
    dtype: str,
    threads: int | None = None,
    shapes: list[tuple[int, int, int]] = SHAPES,
) -> dict[str, float]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    out: dict[str, float] = {}
    with torch.no_grad():
        for m, k, n in shapes:
            a = torch.randn(m, k).to(kind)
            w = torch.randn(k, n).to(kind)
            out[f"{m}x{k}x{n}"] = _time(lambda: torch.matmul(a, w), seconds)
    return out


def summary(times: dict[str, float]) -> dict[str, object]:
    """GFLOP/s per shape and the aggregate rate (``rate``) from median seconds per shape."""
    flops = {}
    for key in times:
        m, k, n = (int(v) for v in key.split("x"))
        flops[key] = 2 * m * k * n
    per = {key: flops[key] / times[key] / 1e9 for key in times}
    rate = sum(flops.values()) / sum(times.values()) / 1e9
    return {"rate": rate, "shapes": per}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--side", choices=["ort", "torch"], required=True)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="torch only")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the library's)")
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per shape (1.5)")
    args = p.parse_args()
    if args.side == "ort":
        if args.dtype != "fp32":
            raise SystemExit("ONNX Runtime's CPU provider has no bf16 MatMul kernel")
        times = ort_rates(args.seconds, args.threads)
    else:
        times = torch_rates(args.seconds, args.dtype, args.threads)
    print(json.dumps({"side": args.side, "dtype": args.dtype, **summary(times)}))


if __name__ == "__main__":
    main()
