"""The UNet's attention maps (export/maps_graph.py) against the PyTorch reference
(export/attention_maps.py), ELITE's gate, and the graph with maps off.

Tolerances: the maps are averages of softmax probabilities and of ``A / M`` computed by the same
operations in the same precision, so ONNX Runtime and PyTorch differ by float32 summation order
only (measured: about 4e-7 of the largest value); TOLERANCE["fp32"] (1e-4 of the largest
value), the exporter's own, leaves the same room as for every other graph output.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.attention_maps import MapRecorder, aggregate, layer_level
from export.exporter import TOLERANCE
from export.graphs import Dims, graph_module, graph_specs, sample_inputs
from export.maps_graph import strip_attention_maps
from export.models import EliteModels
from export.paths import TINY_BUNDLE

UNET = next(s for s in graph_specs(Dims(text_hidden=16, image_hidden=32)) if s.name == "unet")
# sha256 of onnx/tiny/unet.onnx as exported before attention maps (commit 5c0b5d4).
UNET_BEFORE_MAPS = "e1a053e558b59c24b565dda61721ac0134d0cb259e28b2b690129690d1224ddd"


def session(model: onnx.ModelProto | None = None) -> ort.InferenceSession:
    source = str(TINY_BUNDLE / "unet.onnx") if model is None else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def rel(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("batch,latent", [(2, (32, 32)), (3, (24, 40))])
def test_maps_match_pytorch(tiny: EliteModels, batch: int, latent: tuple[int, int]) -> None:
    dims = Dims.of(tiny)
    module = graph_module("unet", tiny)
    inputs = sample_inputs(UNET, dims, batch, latent, 11, want_maps=True)
    recorder = MapRecorder()
    with torch.no_grad():
        noise = module(*(inputs[t.name] for t in UNET.inputs), recorder=recorder)
        maps, gate = aggregate(recorder, latent)
    assert gate is not None and len(recorder.layers) == 16
    got = session().run(None, {k: v.numpy() for k, v in inputs.items()})
    for name, have, want in (
        ("noise_pred", got[0], noise),
        ("attention_maps", got[1], maps),
        ("placeholder_gate", got[2], gate),
    ):
        err = rel(have, want.numpy())
        print(f"B={batch} latent={latent} {name}: max rel {err:.2e}")
        assert err <= TOLERANCE["fp32"]
    assert got[1].shape == (batch, 77, *latent)
    # Each pixel's token maps are averaged probabilities: they sum to 1 up to float32 rounding
    # (the bicubic weights sum to 1; the clamp at 0 acts only where a map undershoots).
    err = float(np.abs(got[1].sum(axis=1) - 1).max())
    print(f"token maps sum to 1 within {err:.1e}")
    assert err <= 1e-4


def test_the_gate_is_elites_normalised_column(tiny: EliteModels) -> None:
    """The recorded gate is ``A / M``: the placeholder's column of ``P_g`` over its max across
    heads and queries of the sample, the tensor ELITE multiplies into the local branch."""
    dims = Dims.of(tiny)
    module = graph_module("unet", tiny)
    inputs = sample_inputs(UNET, dims, 2, (32, 32), 12, want_maps=True)
    recorder = MapRecorder()
    with torch.no_grad():
        module(*(inputs[t.name] for t in UNET.inputs), recorder=recorder)
    index = inputs["local_index"]
    for record in recorder.layers:
        assert record.gate is not None
        column = record.probs[torch.arange(2), :, :, index]  # [B, heads, N]
        peak = column.amax(dim=(1, 2), keepdim=True)
        assert torch.equal(record.gate[..., 0], column / peak)
        assert torch.allclose(record.gate.amax(dim=(1, 2, 3)), torch.ones(2))


def test_layer_levels_follow_the_unet() -> None:
    names = ["down_blocks.0.a.attn2", "down_blocks.2.a.attn2", "mid_block.a.attn2"]
    assert [layer_level(n, 4) for n in names] == [0, 2, 3]
    assert layer_level("up_blocks.1.attentions.0.transformer_blocks.0.attn2", 4) == 2
    # As export/maps_graph.py passes an exported node's scope ("/unet/up_blocks.3/…").
    assert layer_level(".unet.up_blocks.3.attentions.2", 4) == 0
    with pytest.raises(ValueError):
        layer_level("conv_in", 4)


def test_maps_off_is_the_graph_before_maps() -> None:
    """With every flag 0 the outputs are empty and ``noise_pred`` is bit-identical to the UNet
    before maps, which is exactly the committed graph without the pass (its sha256 then)."""
    model = onnx.load(str(TINY_BUNDLE / "unet.onnx"))
    strip_attention_maps(model)
    assert hashlib.sha256(model.SerializeToString()).hexdigest() == UNET_BEFORE_MAPS
    before = session(model)
    after = session()
    dims = Dims(text_hidden=16, image_hidden=32)
    feeds = {k: v.numpy() for k, v in sample_inputs(UNET, dims, 2, (32, 32), 13).items()}
    want = before.run(None, feeds)[0]
    off = after.run(None, dict(feeds, want_attention_maps=np.zeros(2, np.int64)))
    assert np.array_equal(off[0], want)
    assert off[1].size == 0 and off[2].size == 0
    on = after.run(None, dict(feeds, want_attention_maps=np.array([0, 1], np.int64)))
    assert np.array_equal(on[0], want), "asking for maps changed noise_pred"
    assert on[1].shape == (2, 77, 32, 32)


def test_maps_add_less_than_one_percent_to_the_unet() -> None:
    model = onnx.load(str(TINY_BUNDLE / "unet.onnx"))
    size = len(model.SerializeToString())
    strip_attention_maps(model)
    before = len(model.SerializeToString())
    print(f"unet.onnx: {before} → {size} bytes (+{size / before - 1:.2%})")
    assert size <= 1.01 * before
