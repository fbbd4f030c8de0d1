"""The CaiT adapter: parity with `model(x)`, streams and talking-heads probabilities equal to
timm's own modules (forward hooks), the CLS stream only from the class-attention blocks
(METHOD §1b) through `Lens.run` and the tokens table, `self_only` against timm's own
attention with its probabilities edited by a hook, token removal against timm on the
shortened sequence, and the skip / refusal reasons."""

from __future__ import annotations

import pytest
import torch
from timm.models.cait import Cait

from vitlens.errors import UserError
from vitlens.explain.gradients import block_head_importance
from vitlens.lens import Lens, adapter_for
from vitlens.lens.families.base import ModelAdapter
from vitlens.lens.parity import check_parity
from vitlens.lens.perturb import attention_keep_mask
from vitlens.lens.reduce import reduce_logits

from tests import family_checks as checks

DEPTH, CA_DEPTH, GRID, WIDTH, CLASSES = 2, 2, 4, 32, 10
TINY = dict(img_size=32, patch_size=8, embed_dim=WIDTH, depth=DEPTH, depth_token_only=CA_DEPTH, num_heads=2,
            num_classes=CLASSES, init_values=0.5)
N = GRID * GRID
T = 1 + N


def tiny_cait(seed: int = 0, **overrides: object) -> Cait:
    """A tiny timm CaiT with parameters at a scale where attention is far from uniform (and the
    talking-heads biases far from zero)."""
    return checks.tiny(lambda: Cait(**{**TINY, **overrides}), seed)


def all_blocks(model: Cait) -> list[torch.nn.Module]:
    return list(model.blocks) + list(model.blocks_token_only)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_parity_and_anatomy(pool: str) -> None:
    model = tiny_cait(global_pool=pool)
    parity = check_parity(model, checks.images(3))
    assert parity.ok, parity
    checks.assert_class_attention_anatomy(model, "cait", DEPTH, CA_DEPTH)


def test_block_outputs_equal_timms_own_blocks() -> None:
    model = tiny_cait()
    captured, traces = checks.timm_block_outputs(model, checks.images(), all_blocks(model))
    patches = captured[DEPTH - 1]  # timm's image tokens after the self-attention blocks
    for index, (trace, expected) in enumerate(zip(traces, captured), start=1):
        if index <= DEPTH:
            assert (trace.first_token, trace.sublayer_tokens) == (1, None)
            assert trace.resid_post.shape == (2, N, WIDTH)
            torch.testing.assert_close(trace.resid_post, expected, atol=1e-5, rtol=1e-5)
        else:  # timm's class-attention block returns the CLS only; the image tokens pass through
            assert (trace.first_token, trace.sublayer_tokens) == (0, 1)
            assert trace.resid_pre.shape == trace.resid_post.shape == (2, T, WIDTH)
            torch.testing.assert_close(trace.resid_post[:, :1], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(trace.resid_post[:, 1:], patches, atol=1e-5, rtol=1e-5)
        if index == DEPTH + 1:
            torch.testing.assert_close(trace.resid_pre[:, 0], model.cls_token[0].expand(2, -1))
        cls_or_all = slice(0, trace.attn_out.shape[1])
        torch.testing.assert_close(trace.resid_pre[:, cls_or_all] + trace.attn_out + trace.mlp_out,
                                   trace.resid_post[:, cls_or_all], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("index", [1, DEPTH + 1, DEPTH + 2])
def test_sublayer_streams_and_probabilities_equal_timms_modules(index: int) -> None:
    model = tiny_cait()
    x = checks.images()
    block = all_blocks(model)[index - 1]
    block.attn.fused_attn = False  # ClassAttn: timm's explicit softmax, so attn_drop sees the probabilities
    points = {"attn": block.attn, "probs": block.attn.attn_drop, "proj_in": block.attn.proj, "mlp": block.mlp,
              "fc1": block.mlp.fc1}
    seen = checks.seen_in_forward(model, x, points, inputs={"proj_in"})
    with torch.no_grad():
        adapter = adapter_for(model)
        trace = list(adapter.iter_block_traces(adapter.embed(x), need_probs=True))[index - 1]
    torch.testing.assert_close(trace.attn_out, block.gamma_1 * seen["attn"])
    torch.testing.assert_close(trace.mlp_out, block.gamma_2 * seen["mlp"])
    torch.testing.assert_close(trace.attn_coefficients, seen["proj_in"])
    torch.testing.assert_close(trace.mlp_coefficients, seen["fc1"])
    # talking heads: the probabilities after proj_w (what weights the values); class attention: [B, H, 1, T]
    torch.testing.assert_close(trace.attn_probs, seen["probs"])
    assert trace.attn_probs.shape == ((2, 2, N, N) if index <= DEPTH else (2, 2, 1, T))
    values = adapter.value_vectors(index, "attn")
    torch.testing.assert_close(trace.attn_coefficients @ values.T + block.attn.proj.bias, seen["attn"])


def test_lens_run_has_no_cls_rows_before_the_class_attention_blocks() -> None:
    checks.assert_cls_only_from_class_attention(tiny_cait(), checks.images(), DEPTH, CA_DEPTH)


def test_self_only_equals_timms_attention_with_its_probabilities_masked() -> None:
    model = tiny_cait()
    x = checks.images()
    labels = torch.tensor([1, 2])
    adapter = adapter_for(model)
    keep_mask = attention_keep_mask("self_only", T, 1, True)
    assert torch.equal(keep_mask[1:, 1:], torch.eye(N))  # what the self-attention blocks see
    with torch.no_grad():
        unperturbed = model(x)
        # timm's own TalkingHeadAttn, its post-proj_w probabilities multiplied by the mask at attn_drop
        with checks.recording({"output": model.blocks}) as captured:
            handles = checks.timm_with_probs(model.blocks, lambda probs: probs * torch.eye(N))
            expected = model(x)
        for handle in handles:
            handle.remove()
        traces = list(adapter.iter_block_traces(adapter.embed(x), keep_mask))
    assert not torch.allclose(expected, unperturbed, atol=1e-3)
    for trace, block_out in zip(traces[:DEPTH], captured["output"]):
        torch.testing.assert_close(trace.resid_post, block_out, atol=1e-5, rtol=1e-5)
        off_diagonal = trace.attn_probs * (1 - torch.eye(N))
        assert bool((off_diagonal == 0).all())
    torch.testing.assert_close(adapter.model_logits(traces[-1].resid_post), expected, atol=1e-5, rtol=1e-5)
    out = Lens(model).run(x, labels, attention_perturbation="self_only")
    reduced = reduce_logits(expected[:, None].clone(), labels, 5)
    assert torch.equal(out.rank[:, -1, 0, 0], reduced.rank[:, 0])
    assert torch.equal(out.prediction, expected.argmax(dim=1))


def test_no_cls_is_skipped_because_it_changes_nothing() -> None:
    model = tiny_cait()
    x, labels = checks.images(), torch.tensor([1, 2])
    reason = adapter_for(model).anatomy.skip_reason("attn_no_cls")
    assert reason is not None and "no image-token query attends to the CLS" in reason
    plain = Lens(model).run(x, labels)
    no_cls = Lens(model).run(x, labels, attention_perturbation="no_cls")
    assert torch.equal(plain.rank, no_cls.rank)
    torch.testing.assert_close(plain.correct_logit, no_cls.correct_logit, equal_nan=True)


def shortened_logits(model: Cait, x: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's own modules on the kept image tokens only (kept: image indices 0..N-1).

    # -> (image tokens after the self-attention blocks [B, n, d], logits [B, C])
    """
    embedded = model.pos_drop(model.patch_embed(x) + model.pos_embed)
    short = embedded.gather(1, kept[:, :, None].expand(-1, -1, WIDTH))
    patches = model.blocks(short)
    return patches, model.forward_head(model.norm(model.forward_cls(patches)))


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_token_removal_equals_timm_on_the_shortened_sequence(pool: str) -> None:
    """Key masking in the talking heads (score -inf after proj_l, column zeroed after proj_w:
    proj_w's bias would otherwise weight removed keys) == timm on the kept tokens."""
    model = tiny_cait(global_pool=pool)
    assert float(model.blocks[0].attn.proj_w.bias.detach().abs().min()) > 0
    x, labels = checks.images(3), torch.tensor([0, 4, 9])
    orders = [torch.randperm(N, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    kept = torch.stack([order[:6].sort().values for order in orders])  # [B, 6] image indices
    token_keep = torch.zeros(3, N, dtype=torch.bool).scatter_(1, kept, True)
    adapter = adapter_for(model)
    with torch.no_grad():
        patches, expected = shortened_logits(model, x, kept)
        hidden = adapter.embed(x)
        torch.testing.assert_close(adapter.logits_keeping(hidden, kept + 1), expected, atol=1e-5, rtol=1e-5)
        generic = ModelAdapter.logits_keeping(adapter, hidden, kept + 1)  # key masking at full length
        torch.testing.assert_close(generic, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x), expected, atol=1e-3)
    out = Lens(model).run(x, labels, token_keep=token_keep)
    assert torch.equal(out.prediction, expected.argmax(dim=1))
    assert torch.equal(out.token_present[:, 1:], token_keep) and bool(out.token_present[:, 0].all())
    # the kept image tokens' residual stream after the self-attention blocks, projected by hand
    by_hand = reduce_logits(model.head(model.norm(patches)).detach().clone(), labels, 5).rank  # [B, n]
    assert torch.equal(out.rank[:, DEPTH, 0, 1:][token_keep].view(3, 6), by_hand)
    removed = ~token_keep[:, None, None, :].expand(-1, DEPTH + CA_DEPTH + 1, 3, -1)
    assert bool((out.rank[:, :, :, 1:][removed] == -1).all())
    if pool == "token":
        reduced = reduce_logits(expected[:, None].clone(), labels, 5)
        assert torch.equal(out.rank[:, -1, 0, 0], reduced.rank[:, 0])


def test_skips_and_refusals_name_their_reason() -> None:
    model = tiny_cait()
    skipped = dict(adapter_for(model).anatomy.skipped)
    assert set(skipped) == {"attn_no_cls", "explain"}
    assert "class-attention blocks" in skipped["explain"]
    with pytest.raises(UserError, match="explainability does not apply to this model: METHOD §6"):
        block_head_importance(model, checks.images(), torch.tensor([0, 1]))
    with pytest.raises(UserError, match="global_pool=''"):
        adapter_for(tiny_cait(global_pool=""))
    with pytest.raises(UserError, match="without class-attention blocks"):
        adapter_for(tiny_cait(depth_token_only=0))
    with pytest.raises(UserError, match="headless"):
        adapter_for(tiny_cait(num_classes=0))
    broken = tiny_cait()
    broken.blocks[1].attn = broken.blocks_token_only[0].attn
    with pytest.raises(UserError, match="block 2: unsupported self-attention block LayerScaleBlock with ClassAttn"):
        adapter_for(broken)
    for message in (str(v) for v in skipped.values()):
        assert "\n" not in message
    with torch.device("meta"):  # the coverage sweep checks models without weights
        assert adapter_for(Cait(**TINY)).anatomy.family == "cait"
