"""ELITE's semantics in the PyTorch modules: attention, λ, batching, injection, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from export.attention import EliteUNet, LocalContext, cross_attention_names
from export.clip import TextEncoder
from export.models import CheckpointError, EliteModels, load_mapper_checkpoint
from export.reference import token_index, word_index


def unet_inputs(batch: int, seed: int, c_txt: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 24, generator=g),
        torch.rand(batch, generator=g) * 999,
        torch.randn(batch, 77, c_txt, generator=g),
        torch.randn(batch, 256, c_txt, generator=g),
        torch.randint(1, 76, (batch,), generator=g),
    )


@torch.no_grad()
def test_lambda_zero_is_exactly_global_only(tiny: EliteModels) -> None:
    unet = EliteUNet(tiny.unet)
    sample, t, ehs, local, idx = unet_inputs(2, 0, tiny.text_hidden)
    global_only = unet(sample, t, ehs)
    with_zero = unet(sample, t, ehs, local, idx, torch.zeros(2))
    print(f"λ=0 vs global-only: max abs {float((global_only - with_zero).abs().max()):.1e}")
    assert torch.equal(global_only, with_zero)
    with_lambda = unet(sample, t, ehs, local, idx, torch.full((2,), 0.8))
    assert not torch.allclose(global_only, with_lambda), "the local branch has no effect"


@torch.no_grad()
def test_batch_of_two_equals_two_single_calls(tiny: EliteModels) -> None:
    unet = EliteUNet(tiny.unet)
    sample, t, ehs, local, idx = unet_inputs(2, 1, tiny.text_hidden)
    lam = torch.tensor([0.8, 0.3])
    batched = unet(sample, t, ehs, local, idx, lam)
    singles = torch.cat(
        [
            unet(
                sample[i : i + 1],
                t[i : i + 1],
                ehs[i : i + 1],
                local[i : i + 1],
                idx[i : i + 1],
                lam[i : i + 1],
            )
            for i in range(2)
        ]
    )
    err = float((batched - singles).abs().max())
    print(f"batch 2 vs 2× batch 1: max abs {err:.1e}")
    # Same maths, different GEMM shapes: only summation order differs.
    assert err <= 1e-5 * float(singles.abs().max())


@torch.no_grad()
def test_attention_formula_and_zeroed_tokens_stay_in_softmax(tiny: EliteModels) -> None:
    name = cross_attention_names(tiny.unet)[0]
    attn = tiny.unet.get_submodule(name)
    proc = attn.processor
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 10, attn.to_q.in_features, generator=g)
    ehs = torch.randn(2, 77, tiny.text_hidden, generator=g)
    local = torch.randn(2, 256, tiny.text_hidden, generator=g)
    local[:, 100:] = 0  # masked-out tokens: zero vectors
    idx = torch.tensor([5, 9])
    lam = torch.tensor([0.8, 0.6])
    proc.context = LocalContext(local, idx, lam)
    try:
        got = proc(attn, hidden, ehs)
    finally:
        proc.context = None

    heads, scale = attn.heads, attn.scale

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    q, kg, vg = split(attn.to_q(hidden)), split(attn.to_k(ehs)), split(attn.to_v(ehs))
    kl, vl = split(proc.to_k_local(local)), split(proc.to_v_local(local))
    expected = []
    for b in range(2):
        pg = (q[b] @ kg[b].transpose(-1, -2) * scale).softmax(-1)
        logits_l = q[b] @ kl[b].transpose(-1, -2) * scale
        assert torch.all(logits_l[..., 100:] == 0), "zeroed tokens must have logit 0"
        pl = logits_l.softmax(-1)  # zero logits included, not masked to -inf
        a = pg[:, :, idx[b] : idx[b] + 1]
        out = pg @ vg[b] + lam[b] * (pl * (a / a.max())) @ vl[b]
        expected.append(out.transpose(0, 1).reshape(10, -1))
    want = attn.to_out[0](torch.stack(expected))
    err = float((got - want).abs().max())
    print(f"processor vs written-out formula: max abs {err:.1e}")
    assert err < 1e-5


@torch.no_grad()
def test_injection_only_at_index_and_minus_one_is_plain(tiny: EliteModels) -> None:
    enc = TextEncoder(tiny.text)
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(4))
    word = torch.randn(2, tiny.text_hidden)
    plain = tiny.text(input_ids=ids).last_hidden_state
    none = enc(ids, word, torch.tensor([-1, -1]))
    print(f"inj_index=-1 vs CLIPTextModel: max abs {float((plain - none).abs().max()):.1e}")
    assert torch.allclose(plain, none, atol=1e-6)
    injected = enc(ids, word, torch.tensor([5, -1]))
    # Causal attention: positions before the placeholder cannot see it.
    assert torch.equal(injected[0, :5], none[0, :5])
    assert not torch.allclose(injected[0, 5:], none[0, 5:])
    assert torch.equal(injected[1], none[1])
    # Same as replacing the token embedding by hand before position embeddings.
    embeds = tiny.text.embeddings.token_embedding(ids[:1]).clone()
    embeds[0, 5] = word[0]
    manual = enc.text.embeddings(inputs_embeds=embeds)
    from export.clip import causal_mask

    for layer in enc.text.encoder.layers:
        manual = layer(manual, causal_mask(77, manual.dtype))
    manual = enc.text.final_layer_norm(manual)
    assert torch.allclose(manual[0], injected[0], atol=1e-6)


def test_placeholder_rules() -> None:
    assert word_index("a photo of a S", "S") == 5
    assert word_index("a photo of a dog", "S") == 0  # official fallback: BOS
    assert token_index([49406, 320, 338, 320, 338, 49407], 338) == 4  # last occurrence
    with pytest.raises(ValueError):
        token_index([49406, 49407], 338)


def test_checkpoint_loading_is_strict(
    tiny: EliteModels, tiny_upstream: Path, tmp_path: Path
) -> None:
    state = torch.load(tiny_upstream / "global_mapper.pt", weights_only=True)
    dims = (tiny.image_hidden, tiny.text_hidden)

    def load(s: dict[str, torch.Tensor]) -> str:
        path = tmp_path / "m.pt"
        torch.save(s, path)
        with pytest.raises(CheckpointError) as exc:
            load_mapper_checkpoint(path, "global", tiny.unet, *dims)
        print(exc.value)
        return str(exc.value)

    key = "mid_block_attentions_0_transformer_blocks_0_attn2_to_k.weight"
    assert key in load({k: v for k, v in state.items() if k != key})
    assert "unexpected keys (1): extra.weight" in load({**state, "extra.weight": torch.zeros(1)})
    bad = dict(state)
    bad["mapping_2.3.weight"] = torch.zeros(3, 3)
    assert "key mapping_2.3.weight: expected shape" in load(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_mapper_checkpoint(tmp_path / "absent.pt", "global", tiny.unet, *dims)
