#!/usr/bin/env python3
"""Write the runtime test fixtures into tests/fixtures/runtime/.

- `bundle/`: a toy model bundle. Six tiny graphs whose inputs and outputs match the graph
  table of DESIGN.md §2 exactly (names, element types, ranks, dynamic batch / latent axes),
  with trivial maths inside; a placeholder tokenizer.json; an elite.json listing every file
  with its sha256 and size. For manifest, checksum and session tests only: its images mean
  nothing and its tokenizer.json is not a tokenizer.
- `unet_lambda_i64.onnx`: the UNet signature with `local_lambda` as int64 instead of float32.
- `global_mapper_renamed.onnx`: the global mapper with its input renamed to `features` and a
  rank-2 output.
- `unet_maps_partial.onnx`: the UNet signature with the attention maps' `want_attention_maps`
  input but without their outputs (the optional group must be all or nothing).
- `unet_tiny_before_maps.onnx`: the UNet signature at the tiny bundle's text width (16) as
  bundles exported before attention maps have it (no maps input or outputs): put in place of
  a copy of onnx/tiny's UNet, it makes an older bundle.

Needs only the standard library and `onnx`. Deterministic: rerunning rewrites identical files.
Run: `.venv/bin/python export/fixtures_runtime.py`
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

try:  # numpy comes with onnx; only used to build small initializers.
    import numpy as np
except ImportError as error:  # pragma: no cover
    raise SystemExit(f"numpy (an onnx dependency) is required: {error}") from error

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "runtime"

OPSET = 17
IR_VERSION = 8
C_IMG = 8  # toy image_hidden
C_TXT = 4  # toy text_hidden
F32 = TensorProto.FLOAT
I64 = TensorProto.INT64


def value(name: str, elem: int, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def const_i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def const_f32(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def weights(rows: int, cols: int) -> np.ndarray:
    # Deterministic, small, not random: (i - j) / 10.
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return (i - j).astype(np.float32) / 10.0


def model(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="elite-ort export/fixtures_runtime.py",
    )
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    return m


def image_encoder() -> onnx.ModelProto:
    # mean(pixels) broadcast to [B, 5, 257, C_IMG].
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Expand", ["m", "shape"], ["image_features"]),
    ]
    return model(
        "image_encoder",
        nodes,
        [value("pixel_values", F32, ["B", 3, 224, 224])],
        [value("image_features", F32, ["B", 5, 257, C_IMG])],
        [const_i64("shape", [1, 5, 257, C_IMG])],
    )


def global_mapper(input_name: str = "image_features", flat_output: bool = False) -> onnx.ModelProto:
    # mean over the 257 tokens, then a linear map: [B, 5, C_TXT].
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["tokens"], axes=[2], keepdims=0),
        helper.make_node("MatMul", ["tokens", "w"], ["mapped"]),
    ]
    out_dims: list[int | str] = ["B", 5, C_TXT]
    if flat_output:
        nodes.append(helper.make_node("Flatten", ["mapped"], ["word_embeddings"], axis=1))
        out_dims = ["B", 5 * C_TXT]
    else:
        nodes.append(helper.make_node("Identity", ["mapped"], ["word_embeddings"]))
    return model(
        "global_mapper",
        nodes,
        [value(input_name, F32, ["B", 5, 257, C_IMG])],
        [value("word_embeddings", F32, out_dims)],
        [const_f32("w", weights(C_IMG, C_TXT))],
    )


def local_mapper() -> onnx.ModelProto:
    # patch tokens averaged over the 5 layers, mapped, times the mask: [B, 256, C_TXT].
    nodes = [
        helper.make_node("Slice", ["image_features", "starts", "ends", "axes"], ["patches"]),
        helper.make_node("ReduceMean", ["patches"], ["layers_mean"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["layers_mean", "w"], ["mapped"]),
        helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["mapped", "mask3"], ["local_embeddings"]),
    ]
    return model(
        "local_mapper",
        nodes,
        [value("image_features", F32, ["B", 5, 257, C_IMG]), value("mask", F32, ["B", 256])],
        [value("local_embeddings", F32, ["B", 256, C_TXT])],
        [
            const_i64("starts", [1]),
            const_i64("ends", [257]),
            const_i64("axes", [2]),
            const_i64("axis2", [2]),
            const_f32("w", weights(C_IMG, C_TXT)),
        ],
    )


def text_encoder() -> onnx.ModelProto:
    # ids as floats times a row, plus the injected embedding and the index: [B, 77, C_TXT].
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=F32),
        helper.make_node("Unsqueeze", ["ids_f", "axis2"], ["ids3"]),
        helper.make_node("Mul", ["ids3", "row"], ["tok"]),
        helper.make_node("Unsqueeze", ["inj_embedding", "axis1"], ["inj3"]),
        helper.make_node("Cast", ["inj_index"], ["idx_f"], to=F32),
        helper.make_node("Unsqueeze", ["idx_f", "axes12"], ["idx3"]),
        helper.make_node("Add", ["tok", "inj3"], ["sum1"]),
        helper.make_node("Add", ["sum1", "idx3"], ["last_hidden_state"]),
    ]
    return model(
        "text_encoder",
        nodes,
        [
            value("input_ids", I64, ["B", 77]),
            value("inj_embedding", F32, ["B", C_TXT]),
            value("inj_index", I64, ["B"]),
        ],
        [value("last_hidden_state", F32, ["B", 77, C_TXT])],
        [
            const_i64("axis1", [1]),
            const_i64("axis2", [2]),
            const_i64("axes12", [1, 2]),
            const_f32("row", np.full((1, C_TXT), 1e-3)),
        ],
    )


def unet(lambda_type: int = F32, c_txt: int = C_TXT, maps_input: bool = False) -> onnx.ModelProto:
    # sample * 0.5 + per-sample scalar from every other input: [B, 4, h, w].
    lam = "local_lambda"
    nodes = []
    extra = []
    if maps_input:
        nodes.append(helper.make_node("Cast", ["want_attention_maps"], ["want_f"], to=F32))
        extra = [value("want_attention_maps", I64, ["B"])]
        lam_sources = ["t_lam_raw", "want_f"]
    else:
        lam_sources = []
    if lambda_type != F32:
        nodes.append(helper.make_node("Cast", ["local_lambda"], ["lambda_f"], to=F32))
        lam = "lambda_f"
    if lam_sources:
        nodes += [
            helper.make_node("Mul", ["timestep", lam], ["t_lam_raw"]),
            helper.make_node("Add", lam_sources, ["t_lam"]),
        ]
    else:
        nodes.append(helper.make_node("Mul", ["timestep", lam], ["t_lam"]))
    nodes += [
        helper.make_node("ReduceMean", ["encoder_hidden_states"], ["ehs"], axes=[1, 2], keepdims=0),
        helper.make_node("ReduceMean", ["local_embeddings"], ["loc"], axes=[1, 2], keepdims=0),
        helper.make_node("Cast", ["local_index"], ["idx_f"], to=F32),
        helper.make_node("Sum", ["t_lam", "ehs", "loc", "idx_f"], ["s"]),
        helper.make_node("Unsqueeze", ["s", "axes123"], ["s4"]),
        helper.make_node("Mul", ["sample", "half"], ["scaled"]),
        helper.make_node("Add", ["scaled", "s4"], ["noise_pred"]),
    ]
    return model(
        "unet",
        nodes,
        [
            value("sample", F32, ["B", 4, "h", "w"]),
            value("timestep", F32, ["B"]),
            value("encoder_hidden_states", F32, ["B", 77, c_txt]),
            value("local_embeddings", F32, ["B", 256, c_txt]),
            value("local_index", I64, ["B"]),
            value("local_lambda", lambda_type, ["B"]),
        ]
        + extra,
        [value("noise_pred", F32, ["B", 4, "h", "w"])],
        [const_i64("axes123", [1, 2, 3]), const_f32("half", np.array(0.5))],
    )


def vae_decoder() -> onnx.ModelProto:
    # nearest 8x upsampling of the first 3 channels, squashed by tanh: [B, 3, 8h, 8w].
    nodes = [
        helper.make_node("Slice", ["latent_sample", "starts", "ends", "axes"], ["rgb"]),
        helper.make_node("Resize", ["rgb", "", "scales"], ["big"], mode="nearest"),
        helper.make_node("Tanh", ["big"], ["sample"]),
    ]
    return model(
        "vae_decoder",
        nodes,
        [value("latent_sample", F32, ["B", 4, "h", "w"])],
        [value("sample", F32, ["B", 3, "H8", "W8"])],
        [
            const_i64("starts", [0]),
            const_i64("ends", [3]),
            const_i64("axes", [1]),
            const_f32("scales", np.array([1.0, 1.0, 8.0, 8.0])),
        ],
    )


def save(m: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.SerializeToString())


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_bundle(bundle: Path) -> None:
    graphs = {
        "image_encoder.onnx": image_encoder(),
        "global_mapper.onnx": global_mapper(),
        "local_mapper.onnx": local_mapper(),
        "text_encoder.onnx": text_encoder(),
        "unet.onnx": unet(),
        "vae_decoder.onnx": vae_decoder(),
    }
    for file_name, m in graphs.items():
        save(m, bundle / file_name)
    placeholder = {"comment": "runtime test fixture: a placeholder, not a tokenizer"}
    (bundle / "tokenizer.json").write_text(json.dumps(placeholder) + "\n", encoding="utf-8")
    files = {}
    for file_name in sorted([*graphs, "tokenizer.json"]):
        path = bundle / file_name
        files[file_name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    manifest = {
        "format_version": 1,
        "name": "runtime-fixture",
        "precision": "fp32",
        "source": {
            "unet": "none (toy graph)",
            "clip": "none (toy graph)",
            "global_mapper": "none (toy graph)",
            "local_mapper": "none (toy graph)",
            "exporter": "export/fixtures_runtime.py",
            "random_weights": True,
        },
        "dims": {
            "text_hidden": C_TXT,
            "image_hidden": C_IMG,
            "image_size": 224,
            "patch_grid": 16,
            "latent_channels": 4,
            "vae_scale_factor": 8,
            "size_multiple": 64,
            "max_tokens": 77,
        },
        "clip_layers": [24, 4, 8, 12, 16],
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "scheduler": {
            "kind": "lms",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
        },
        "vae_scaling_factor": 0.18215,
        "defaults": {
            "steps": 100,
            "guidance_scale": 5.0,
            "lambda_generate": 0.8,
            "lambda_edit": 0.6,
            "placeholder": "S",
            "height": 512,
            "width": 512,
        },
        "files": files,
    }
    (bundle / "elite.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    write_bundle(OUT / "bundle")
    save(unet(lambda_type=I64), OUT / "unet_lambda_i64.onnx")
    save(global_mapper(input_name="features", flat_output=True), OUT / "global_mapper_renamed.onnx")
    save(unet(maps_input=True), OUT / "unet_maps_partial.onnx")
    save(unet(c_txt=16), OUT / "unet_tiny_before_maps.onnx")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT.relative_to(ROOT)} ({total} bytes)")


if __name__ == "__main__":
    main()
