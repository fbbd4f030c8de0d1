"""Per-head and per-source direct logit attribution (METHOD §3b) on every timm family with
token-to-token attention: the sum identity, the source split, the readout by hand and the
brute-force head ablation (`tests/family_checks.assert_head_attribution_is_exact`)."""

from __future__ import annotations

import pytest
import torch
from timm.models.beit import Beit
from timm.models.cait import Cait
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from timm.models.xcit import Xcit

from tests.family_checks import assert_head_attribution_is_exact, images, layer_norm_direction, tiny
from vitlens.lens.families import adapter_for
from vitlens.lens.heads import head_attribution

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=7)  # 4 x 4 grid
LABELS = torch.tensor([3, 5])


def vit(**options: object) -> VisionTransformer:
    return tiny(lambda: VisionTransformer(**{**SMALL, **options}))


def test_vit_with_layer_scale_by_hand_and_by_ablation() -> None:
    model = vit(init_values=0.5)
    adapter = adapter_for(model)
    direction = layer_norm_direction(model.norm, lambda y: model.head.weight[y])
    heads = assert_head_attribution_is_exact(adapter, images(), LABELS, direction,
                                             out_projection=lambda b: model.blocks[b - 1].attn.proj)
    assert heads.dla.shape == (2, 2, 4, 17) and not bool(heads.dla.isnan().any())


def test_gap_with_fc_norm_by_ablation() -> None:
    model = vit(class_token=False, global_pool="avg", fc_norm=True)
    adapter = adapter_for(model)
    direction = layer_norm_direction(model.fc_norm, lambda y: model.head.weight[y])
    heads = assert_head_attribution_is_exact(adapter, images(), LABELS, direction,
                                             out_projection=lambda b: model.blocks[b - 1].attn.proj)
    assert not heads.has_class_token and bool(heads.cls_source.isnan().all())


def test_distilled_reads_through_the_mean_of_both_heads() -> None:
    model = tiny(lambda: VisionTransformerDistilled(**SMALL))
    adapter = adapter_for(model)
    direction = layer_norm_direction(model.norm, lambda y: (model.head.weight[y] + model.head_dist.weight[y]) / 2)
    assert_head_attribution_is_exact(adapter, images(), LABELS, direction,
                                     out_projection=lambda b: model.blocks[b - 1].attn.proj)


@pytest.mark.parametrize("build", [
    lambda: Beit(**{**SMALL, "use_rel_pos_bias": True, "init_values": 0.3, "global_pool": "token"}),
    lambda: Eva(**{**SMALL, "use_rot_pos_emb": True, "ref_feat_shape": (2, 2), "init_values": 0.3}),
    lambda: VisionTransformerRelPos(**{**SMALL, "rel_pos_dim": 16}),
], ids=["beit", "eva", "relpos"])
def test_position_biased_families(build) -> None:
    model = tiny(build)
    assert_head_attribution_is_exact(adapter_for(model), images(), LABELS,
                                     out_projection=lambda b: model.blocks[b - 1].attn.proj)


def test_cait_covers_what_each_block_writes() -> None:
    model = tiny(lambda: Cait(img_size=32, patch_size=8, embed_dim=32, depth=2, depth_token_only=1, num_heads=2,
                              num_classes=7, init_values=0.5))
    adapter = adapter_for(model)
    heads = assert_head_attribution_is_exact(adapter, images(), LABELS)
    # self-attention blocks write the 16 image tokens; the class-attention block the CLS alone
    written = (~heads.dla[0, :, 0].isnan()).sum(-1).tolist()
    assert written == [16, 16, 1]
    assert bool(heads.cls_source[:, :2].isnan().all()) and not bool(heads.cls_source[:, 2].isnan().any())


@pytest.mark.parametrize("build, reason", [
    (lambda: vit(block_fn=ResPostBlock), "post-norm"),
    (lambda: vit(class_token=False, global_pool="map"), "pools by attention"),
    (lambda: vit(block_fn=ParallelScalingBlock), "parallel"),
    (lambda: vit(attn_layer="attn", scale_attn_norm=True), "mixes the heads"),
    (lambda: tiny(lambda: Xcit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=7,
                               cls_attn_layers=1)), "cross-covariance"),
], ids=["post_norm", "map_pool", "parallel", "attn_norm", "xcit"])
def test_skipped_with_a_reason(build, reason: str) -> None:
    try:
        model = build()
    except TypeError as error:  # an option this timm version does not have
        pytest.skip(str(error))
    adapter = adapter_for(model)
    assert reason in (adapter.anatomy.skip_reason("heads") or "")
    with pytest.raises(ValueError, match="does not apply"):
        head_attribution(adapter, images(), LABELS, torch.zeros(2, adapter.anatomy.num_tokens, dtype=torch.int8))
