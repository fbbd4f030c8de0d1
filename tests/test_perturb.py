"""Attention perturbations (self_only, no_cls) and token removal change only what they should."""

from __future__ import annotations

import pytest
import torch

from vitlens.errors import UserError
from vitlens.lens import Lens, STREAM_RESID, attention_keep_mask, describe_model, embed, token_keep_from_labels
from vitlens.lens.attention import attention_sublayer
from vitlens.lens.forward import iter_block_traces
from tests.test_lens_forward import tiny_vit

PREFIX = 1
TOKENS = 17  # CLS + 4x4 patches


def block_one_probs(model: torch.nn.Module, images: torch.Tensor, perturbation: str | None) -> torch.Tensor:
    """Post-mask attention probabilities of block 1 for `images`."""
    anatomy = describe_model(model)
    mask = attention_keep_mask(perturbation, TOKENS, PREFIX, True) if perturbation else None
    with torch.inference_mode():
        trace = next(iter_block_traces(model, embed(model, images, anatomy), anatomy, mask, need_probs=True))
    return trace.attn_probs


def test_keep_mask_by_hand() -> None:
    self_only = attention_keep_mask("self_only", 4, 1, True)
    assert self_only.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]
    no_cls = attention_keep_mask("no_cls", 4, 2, True)  # CLS + one register
    assert no_cls.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]]
    with pytest.raises(UserError, match="CLS"):
        attention_keep_mask("no_cls", 4, 0, False)
    with pytest.raises(UserError, match="self_everything"):
        attention_keep_mask("self_everything", 4, 1, True)  # type: ignore[arg-type]


def test_self_only_changes_only_image_rows_to_other_image_tokens() -> None:
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    plain = block_one_probs(model, images, None)
    perturbed = block_one_probs(model, images, "self_only")
    assert torch.equal(perturbed[:, :, :PREFIX], plain[:, :, :PREFIX])  # CLS query rows unchanged
    eye = torch.eye(TOKENS, dtype=torch.bool)
    image_rows = torch.zeros(TOKENS, TOKENS, dtype=torch.bool)
    image_rows[PREFIX:] = True
    other_images = image_rows.clone()
    other_images[:, :PREFIX] = False
    other_images &= ~eye
    assert torch.all(perturbed[..., other_images] == 0)
    kept = image_rows & ~other_images  # i->i and i->prefix keep their unnormalised weight
    assert torch.equal(perturbed[..., kept], plain[..., kept])
    assert bool((perturbed[:, :, PREFIX:].sum(-1) < 1).all())  # no renormalisation


def test_no_cls_zeroes_only_image_to_cls_weights() -> None:
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    plain = block_one_probs(model, images, None)
    perturbed = block_one_probs(model, images, "no_cls")
    changed = torch.zeros(TOKENS, TOKENS, dtype=torch.bool)
    changed[PREFIX:, 0] = True
    assert torch.all(perturbed[..., changed] == 0)
    assert torch.equal(perturbed[..., ~changed], plain[..., ~changed])


def block_one_head_coefficients(
    model: torch.nn.Module, images: torch.Tensor, perturbation: str | None
) -> torch.Tensor:
    """Per-head attention outputs (A·V) of block 1, [B, T, H, head_dim]."""
    anatomy = describe_model(model)
    mask = attention_keep_mask(perturbation, TOKENS, PREFIX, True) if perturbation else None
    with torch.inference_mode():
        trace = next(iter_block_traces(model, embed(model, images, anatomy), anatomy, mask))
    return trace.attn_coefficients.unflatten(-1, (model.blocks[0].attn.num_heads, -1))


def test_self_only_image_token_mixes_only_itself_and_prefix_at_block_one() -> None:
    """Without renormalisation, token i's head output is (e^s_ii v_i + e^s_i0 v_0) / Z_i: another
    patch can change only the softmax denominator Z_i, i.e. rescale each head's output."""
    model = tiny_vit()
    images = torch.randn(1, 3, 32, 32)
    edited = images.clone()
    edited[:, :, 0:8, 8:16] += 1.0  # patch (0, 1) = image token 1 = sequence position 2
    other_position = PREFIX + 5
    for perturbation, expect_parallel in (("self_only", True), (None, False)):
        before = block_one_head_coefficients(model, images, perturbation)[0, other_position]
        after = block_one_head_coefficients(model, edited, perturbation)[0, other_position]
        cosine = torch.nn.functional.cosine_similarity(before, after, dim=-1)  # per head
        assert bool((cosine > 1 - 1e-5).all()) == expect_parallel, perturbation
        assert not torch.allclose(before, after)  # the denominator (or more) did change


def test_attention_sublayer_mask_applies_after_softmax() -> None:
    model = tiny_vit()
    attn = model.blocks[0].attn
    x = torch.randn(1, TOKENS, 32)
    mask = attention_keep_mask("self_only", TOKENS, PREFIX, True)
    with torch.inference_mode():
        plain = attention_sublayer(attn, x, need_probs=True)
        masked = attention_sublayer(attn, x, keep_mask=mask)
    v = attn.qkv(x).unflatten(-1, (3, attn.num_heads, attn.head_dim))[:, :, 2].transpose(1, 2)
    expected = ((plain.probs * mask) @ v).transpose(1, 2).reshape(1, TOKENS, 32)
    assert torch.allclose(masked.coefficients, expected, atol=1e-6)


def test_token_removal_matches_timm_blocks_on_the_shortened_sequence() -> None:
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([1, 4, 7])
    token_keep = torch.zeros(3, 16, dtype=torch.bool)
    token_keep[0, [0, 5, 6, 15]] = True
    token_keep[1, [1, 2, 3, 4, 9, 10]] = True
    token_keep[2, [3, 8, 12, 13]] = True  # images 0 and 2 share a group, image 1 is alone
    out = Lens(model).run(images, labels, token_keep=token_keep)
    with torch.no_grad():
        embedded = model._pos_embed(model.patch_embed(images))
    for b in range(3):
        positions = [0] + [PREFIX + int(i) for i in torch.nonzero(token_keep[b]).squeeze(1)]
        with torch.no_grad():
            final = model.norm(model.blocks(embedded[b : b + 1, positions]))
            logits = model.head(final)[0]  # [T', C]
        expected_rank = (logits > logits[:, labels[b]][:, None]).sum(-1)
        present = out.token_present[b]
        assert torch.nonzero(present).squeeze(1).tolist() == positions
        assert out.rank[b, -1, STREAM_RESID, present].tolist() == expected_rank.tolist()
        assert torch.allclose(out.correct_logit[b, -1, STREAM_RESID, present], logits[:, labels[b]], atol=1e-5)
        assert bool((out.rank[b, :, :, ~present] == -1).all())
        assert bool(out.correct_logit[b, :, :, ~present].isnan().all())
        assert out.prediction[b].item() == int(logits[0].argmax())


def test_token_keep_from_labels() -> None:
    token_label = torch.tensor([[3, 1, 0, 1, 2]])  # prefix, class, context, class, ignore
    assert token_keep_from_labels(token_label, 1, 1).tolist() == [[False, True, False, True]]


def test_gap_model_perturbations() -> None:
    """GAP (no prefix): self_only leaves only the diagonal; no_cls has no CLS to remove."""
    from timm.models.vision_transformer import ResPostBlock

    model = tiny_vit(class_token=False, global_pool="avg", block_fn=ResPostBlock, init_values=0.5)
    anatomy = describe_model(model)
    mask = attention_keep_mask("self_only", 16, anatomy.num_prefix_tokens, anatomy.has_class_token)
    assert torch.equal(mask, torch.eye(16))
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        trace = next(iter_block_traces(model, embed(model, images, anatomy), anatomy, mask))
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    assert bool((trace.attn_probs[..., off_diagonal] == 0).all())
    with pytest.raises(UserError, match="CLS"):
        Lens(model).run(images, torch.tensor([0, 1]), attention_perturbation="no_cls")


def test_token_removal_on_a_gap_model_pools_only_kept_tokens() -> None:
    """GAP (post-norm blocks, no prefix): removal equals timm on the shortened sequence,
    including the prediction, which averages only the kept tokens."""
    from timm.models.vision_transformer import ResPostBlock

    model = tiny_vit(class_token=False, global_pool="avg", block_fn=ResPostBlock, init_values=0.5)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([2, 9])
    token_keep = torch.zeros(2, 16, dtype=torch.bool)
    token_keep[0, [1, 2, 7, 11, 12]] = True
    token_keep[1, 3:13] = True
    out = Lens(model).run(images, labels, token_keep=token_keep)
    with torch.no_grad():
        embedded = model._pos_embed(model.patch_embed(images))
        for b in range(2):
            kept = torch.nonzero(token_keep[b]).squeeze(1)
            final = model.blocks(embedded[b : b + 1, kept])
            expected_logits = model.forward_head(model.norm(final))[0]  # timm's own pooled output
            token_logits = model.head(model.fc_norm(model.norm(final)))[0]  # [n, C]
            assert out.prediction[b].item() == int(expected_logits.argmax())
            assert torch.allclose(out.correct_logit[b, -1, STREAM_RESID, kept], token_logits[:, labels[b]], atol=1e-5)
