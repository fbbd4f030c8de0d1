"""The XCiT adapter: parity with `model(x)` (with and without `tokens_norm`, average pooling,
no position encoding), streams equal to timm's own modules (forward hooks; LPI inside the
MLP's input stream), the class-attention block's image-token updates by hand, the CLS stream
only from the class-attention blocks through `Lens.run` and the tokens table, and the
skipped experiments refused with their reasons."""

from __future__ import annotations

import pytest
import torch
from timm.models.xcit import Xcit

from vitlens.data.token_labels import LABEL_CONTEXT, LABEL_PREFIX
from vitlens.errors import UserError
from vitlens.explain.gradients import block_head_importance
from vitlens.lens import Lens, adapter_for
from vitlens.lens.anatomy import EXPLAIN_EXPERIMENT, PERTURBATION_EXPERIMENTS
from vitlens.lens.parity import check_parity
from vitlens.lens.reduce import reduce_logits
from vitlens.store.records import tokens_table

DEPTH, CA_DEPTH, GRID, WIDTH, CLASSES = 2, 2, 4, 32, 10
TINY = dict(img_size=32, patch_size=8, embed_dim=WIDTH, depth=DEPTH, cls_attn_layers=CA_DEPTH, num_heads=2,
            num_classes=CLASSES, eta=0.5)
N = GRID * GRID
T = 1 + N
OPTIONS = {
    "cls_norm_only": dict(tokens_norm=False),
    "tokens_norm": dict(tokens_norm=True),
    "avg": dict(global_pool="avg", tokens_norm=True),
    "no_pos_embed": dict(use_pos_embed=False),
}


def tiny_xcit(seed: int = 0, **overrides: object) -> Xcit:
    """A tiny timm XCiT with parameters far from their initialisation (temperatures, layer
    scales and norms included)."""
    torch.manual_seed(seed)
    model = Xcit(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.3)
    return model


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def all_blocks(model: Xcit) -> list[torch.nn.Module]:
    return list(model.blocks) + list(model.cls_attn_blocks)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_parity_and_anatomy(option: str) -> None:
    model = tiny_xcit(**OPTIONS[option])
    parity = check_parity(model, images(3))
    assert parity.ok, parity
    anatomy = adapter_for(model).anatomy
    assert (anatomy.family, anatomy.num_blocks, anatomy.cls_from_block) == ("xcit", DEPTH + CA_DEPTH, DEPTH + 1)
    assert (anatomy.num_prefix_tokens, anatomy.num_tokens) == (1, T)
    assert (anatomy.grid_size, anatomy.token_cell) == ((4, 4), (8, 8))


@pytest.mark.parametrize("option", ["cls_norm_only", "tokens_norm"])
def test_block_outputs_equal_timms_own_blocks(option: str) -> None:
    model = tiny_xcit(**OPTIONS[option])
    x = images()
    captured: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _i, out: captured.append(out)) for b in all_blocks(model)]
    with torch.no_grad():
        model(x)
        for handle in handles:
            handle.remove()
        adapter = adapter_for(model)
        traces = list(adapter.iter_block_traces(adapter.embed(x)))
    for index, (trace, expected) in enumerate(zip(traces, captured), start=1):
        torch.testing.assert_close(trace.resid_post, expected, atol=1e-5, rtol=1e-5)
        if index <= DEPTH:
            assert (trace.first_token, trace.sublayer_tokens, trace.resid_post.shape[1]) == (1, None, N)
        else:
            assert (trace.first_token, trace.sublayer_tokens, trace.resid_post.shape[1]) == (0, 1, T)
            assert trace.attn_out.shape == trace.mlp_out.shape == (2, 1, WIDTH)
    torch.testing.assert_close(traces[DEPTH].resid_pre[:, 0], model.cls_token[0].expand(2, -1))


def test_xca_block_streams_equal_timms_modules_with_lpi_in_the_mlp_input() -> None:
    model = tiny_xcit()
    x = images()
    block = model.blocks[1]
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, use_input: bool = False):
        return lambda _m, inputs, out: seen.__setitem__(name, inputs[0] if use_input else out)

    handles = [
        block.register_forward_hook(lambda _m, inputs, _o: seen.__setitem__("block_in", inputs[0])),
        block.attn.register_forward_hook(keep("attn")),
        block.attn.proj.register_forward_hook(keep("proj_in", True)),
        block.local_mp.register_forward_hook(keep("lpi")),
        block.mlp.register_forward_hook(keep("mlp")),
        block.mlp.fc1.register_forward_hook(keep("fc1")),
    ]
    with torch.no_grad():
        model(x)
        for handle in handles:  # the adapter calls these submodules itself
            handle.remove()
        adapter = adapter_for(model)
        trace = list(adapter.iter_block_traces(adapter.embed(x)))[1]
        torch.testing.assert_close(trace.resid_pre, seen["block_in"])
        torch.testing.assert_close(trace.attn_out, block.gamma1 * seen["attn"])
        torch.testing.assert_close(trace.mlp_out, block.gamma2 * seen["mlp"])
        lpi_out = block.gamma3 * seen["lpi"]
        torch.testing.assert_close(trace.resid_mid, seen["block_in"] + trace.attn_out + lpi_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trace.attn_coefficients, seen["proj_in"])
        torch.testing.assert_close(trace.mlp_coefficients, seen["fc1"])
        torch.testing.assert_close(trace.attn_coefficients @ adapter.value_vectors(2, "attn").T + block.attn.proj.bias,
                                   seen["attn"])
        assert trace.attn_probs is None


@pytest.mark.parametrize("option", ["cls_norm_only", "tokens_norm"])
def test_class_attention_block_by_hand(option: str) -> None:
    """timm's ClassAttentionBlock: image tokens get gamma1·norm1(x) added, the CLS residual is
    replaced by norm2 (every token with tokens_norm), image tokens are doubled at the end."""
    model = tiny_xcit(**OPTIONS[option])
    x = images()
    block = model.cls_attn_blocks[0]
    seen: dict[str, torch.Tensor] = {}
    handles = [
        block.attn.register_forward_hook(lambda _m, _i, out: seen.__setitem__("attn", out)),
        block.mlp.register_forward_hook(lambda _m, _i, out: seen.__setitem__("mlp", out)),
        block.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out)),
    ]
    with torch.no_grad():
        model(x)
        for handle in handles:
            handle.remove()
        adapter = adapter_for(model)
        trace = list(adapter.iter_block_traces(adapter.embed(x)))[DEPTH]
        sequence = trace.resid_pre  # [cls_token, image tokens]
        torch.testing.assert_close(trace.attn_out, block.gamma1 * seen["attn"])
        torch.testing.assert_close(trace.mlp_out, block.gamma2 * seen["mlp"])
        cls_mid = block.norm2(sequence[:, :1] + block.gamma1 * seen["attn"])
        image_mid = sequence[:, 1:] + block.gamma1 * block.norm1(sequence[:, 1:])
        if block.tokens_norm:
            image_mid = block.norm2(image_mid)
        torch.testing.assert_close(trace.resid_mid, torch.cat([cls_mid, image_mid], dim=1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trace.resid_post[:, 1:], 2 * image_mid, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trace.resid_post[:, :1], cls_mid + block.gamma2 * seen["mlp"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trace.resid_post, seen["out"], atol=1e-5, rtol=1e-5)


def test_lens_run_has_no_cls_rows_before_the_class_attention_blocks() -> None:
    model = tiny_xcit()
    x = images()
    labels = torch.tensor([3, 7])
    out = Lens(model).run(x, labels)
    assert out.rank.shape == (2, DEPTH + CA_DEPTH + 1, 3, T)
    cls, image = out.rank[:, :, :, 0], out.rank[:, :, :, 1:]
    assert bool((cls[:, : DEPTH + 1] == -1).all())
    assert bool((cls[:, DEPTH + 1 :] >= 0).all())
    assert bool((image[:, :, 0] >= 0).all())
    assert bool((image[:, 1 : DEPTH + 1, 1:] >= 0).all())
    assert bool((image[:, DEPTH + 1 :, 1:] == -1).all())
    with torch.no_grad():
        logits = model(x)
    expected = reduce_logits(logits[:, None].clone(), labels, 5)
    assert torch.equal(out.rank[:, -1, 0, 0], expected.rank[:, 0])
    torch.testing.assert_close(out.correct_logit[:, -1, 0, 0], expected.correct_logit[:, 0])
    assert torch.equal(out.prediction, logits.argmax(dim=1))

    token_label = torch.full((2, T), LABEL_CONTEXT, dtype=torch.int8)
    token_label[:, 0] = LABEL_PREFIX
    rows = tokens_table(out, ["a", "b"], torch.zeros(2, T), token_label, has_class_token=True).to_pylist()
    cls_rows = [r for r in rows if r["token"] == 0]
    assert {r["block"] for r in cls_rows} == set(range(DEPTH + 1, DEPTH + CA_DEPTH + 1))
    assert not [r for r in rows if r["token"] > 0 and r["stream"] != "resid" and r["block"] > DEPTH]
    assert len(rows) == 2 * (CA_DEPTH * 3 + N * ((DEPTH + CA_DEPTH + 1) + 2 * DEPTH))


def test_skipped_experiments_and_refusals_name_their_reason() -> None:
    model = tiny_xcit()
    adapter = adapter_for(model)
    skipped = dict(adapter.anatomy.skipped)
    assert set(skipped) == set(PERTURBATION_EXPERIMENTS) | {EXPLAIN_EXPERIMENT}
    assert "no token-to-token attention" in skipped["attn_self_only"] == skipped["attn_no_cls"]
    assert "LPI" in skipped["remove_class_tokens"] and "LPI" in skipped["remove_context_tokens"]
    assert all("\n" not in reason for reason in skipped.values())
    x, labels = images(), torch.tensor([0, 1])
    for perturbation in ("self_only", "no_cls"):
        with pytest.raises(UserError, match="do not apply"):
            Lens(model).run(x, labels, attention_perturbation=perturbation)
    with pytest.raises(UserError, match="do not apply"):
        Lens(model).run(x, labels, token_keep=torch.ones(2, N, dtype=torch.bool))
    with torch.no_grad(), pytest.raises(UserError, match="LPI"):
        adapter.logits_keeping(adapter.embed(x), torch.arange(1, 5).expand(2, -1))
    with pytest.raises(UserError, match="explainability does not apply to this model"):
        block_head_importance(model, x, labels)
    with pytest.raises(UserError, match="no token-to-token attention"):
        adapter.block_forward(1, adapter.embed(x), need_probs=True)
    with pytest.raises(UserError, match=r"token grid"):
        adapter.embed(torch.randn(1, 3, 48, 48))
    with pytest.raises(UserError, match="global_pool=''"):
        adapter_for(tiny_xcit(global_pool=""))
    with pytest.raises(UserError, match="without class-attention blocks"):
        adapter_for(tiny_xcit(cls_attn_layers=0))
    with pytest.raises(UserError, match="headless"):
        adapter_for(tiny_xcit(num_classes=0))
    with pytest.raises(UserError, match="not a whole number"):
        adapter_for(tiny_xcit(img_size=(32, 36)))
    with torch.device("meta"):  # the coverage sweep checks models without weights
        assert adapter_for(Xcit(**TINY)).anatomy.family == "xcit"
