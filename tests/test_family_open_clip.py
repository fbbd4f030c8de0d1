"""open_clip towers (`vitlens/lens/families/open_clip.py`, `open_clip_timm.py`) and their loader
(`vitlens/models/open_clip_models.py`) against open_clip's own modules.

Every expectation comes from open_clip (or torch / timm modules it calls): forward hooks on
`transformer.resblocks[i]` and its sub-modules, the probabilities of the blocks' own
`nn.MultiheadAttention` (`need_weights=True, average_attn_weights=False`), `encode_image`,
`encode_text`, the tower's own `_pool` on a sequence whose tokens all equal h (the "one token"
head path), its transformer on a shortened sequence (token removal), `build_zero_shot_classifier`
for the class space, `image_transform` for the preprocessing and `create_model` /
`load_checkpoint` for the weights. Tiny CLIPs in every tower option, every parameter re-drawn so
no branch hides (LayerScale, norms, the text tower that builds the class space).
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from torch import nn

from vitlens.data.geometry import EvalGeometry
from vitlens.errors import UserError
from vitlens.lens import STREAM_RESID, Lens
from vitlens.lens.classifiers import ZeroShotClassifier
from vitlens.lens.families import adapter_for
from vitlens.lens.families.open_clip import OpenClipAdapter
from vitlens.lens.families.open_clip_timm import OpenClipTimmAdapter
from vitlens.lens.parity import check_parity
from vitlens.models.open_clip_models import (
    PooledFeatures,
    data_config_from_preprocess,
    load_open_clip,
    open_clip_architectures,
)

EMBED, CONTEXT = 24, 16
CLASSES = ("cat", "dog", "car", "tree", "boat")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")
VISION = dict(layers=2, width=64, head_width=32, image_size=32, patch_size=8)  # 4 x 4 grid, T = 17, 2 heads
TEXT = dict(context_length=CONTEXT, width=32, heads=2, layers=1)
OPTIONS: dict[str, dict] = {
    "tok": dict(),  # OpenAI / LAION CLIP: CLS pooling, ln_pre, GELU
    "tok_layer_scale_quickgelu_sincos": dict(ls_init_value=0.5, pos_embed_type="sin_cos_2d", quick_gelu=True),
    "avg_final_ln_no_ln_pre": dict(pool_type="avg", final_ln_after_pool=True, no_ln_pre=True),  # CLIPA
    "avg_ln_before_pool": dict(pool_type="avg"),
    "attentional_pool": dict(attentional_pool=True, attn_pooler_queries=3, attn_pooler_heads=2),  # CoCa
    "custom_blocks": dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True,
                          scale_fc=True, ls_init_value=0.5),
}
DEFAULT_BLOCKS = [o for o in OPTIONS if o != "custom_blocks"]


@pytest.fixture(scope="module")
def tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=CONTEXT)


def redraw(module: nn.Module, seed: int) -> None:
    """Every trainable parameter re-drawn: norms and LayerScale around 1, the rest N(0, 0.2²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad or "logit_scale" in name or "logit_bias" in name:
                continue  # sin-cos position embedding (fixed), the temperature
            leaf = name.rsplit(".", 1)[-1]
            if parameter.ndim == 1 and (leaf in ("weight", "gamma") or "scale" in name):
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
            else:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))


def tiny_clip(option: str, seed: int = 0) -> CLIP:
    """A tiny open_clip `CLIP` with the vision option `option`, every parameter re-drawn."""
    vision = {**VISION, **OPTIONS[option]}
    quick_gelu = vision.pop("quick_gelu", False)
    torch.manual_seed(seed)
    model = CLIP(embed_dim=EMBED, vision_cfg=CLIPVisionCfg(**vision), text_cfg=CLIPTextCfg(**TEXT),
                 quick_gelu=quick_gelu)
    redraw(model, seed)
    return model.eval()


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to float rounding: max |difference| <= tol · max(1, max |expected|) (torch's fused
    MHA kernels and the unfused recomputation round differently at residual norms of ~20)."""
    if actual.shape != expected.shape:
        return False
    return float((actual - expected).abs().max()) <= tol * max(1.0, float(expected.abs().max()))


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    """# -> [B, 3, size, size]"""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


class Case:
    """A tiny CLIP, its class space from open_clip's own zero-shot builder, the wrapper, the adapter."""

    def __init__(self, option: str, tokenizer: SimpleTokenizer) -> None:
        self.clip = tiny_clip(option)
        weights = build_zero_shot_classifier(self.clip, tokenizer, CLASSES, TEMPLATES, num_classes_per_batch=None)
        self.scale = float(self.clip.logit_scale.detach().exp())
        self.zero_shot = weights  # [d', C], open_clip's own
        head = nn.Linear(EMBED, len(CLASSES), bias=False)
        with torch.no_grad():
            head.weight.copy_(self.scale * weights.T)
        self.wrapper = ZeroShotClassifier(self.clip.visual, self.clip.visual, EMBED, "open_clip", head).eval()
        self.adapter = adapter_for(self.wrapper)
        self.x = images()

    def library_logits(self, x: torch.Tensor) -> torch.Tensor:
        """open_clip's zero-shot logits: s · n(encode_image(x)) · W. # -> [B, C]"""
        return self.scale * F.normalize(self.clip.encode_image(x), dim=-1) @ self.zero_shot


@pytest.fixture(scope="module")
def cases(tokenizer: SimpleTokenizer) -> dict[str, Case]:
    return {option: Case(option, tokenizer) for option in OPTIONS}


def capture(tower: VisionTransformer, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """open_clip's own forward with each block's input / output, `attn` output, `ls_1` output
    (the attention stream), `c_fc` output, `ls_2` output (the MLP stream) recorded."""
    seen: dict[str, list] = {k: [] for k in ("input", "output", "attn", "ls_1", "c_fc", "ls_2", "proj_in")}
    handles = []
    for block in tower.transformer.resblocks:
        handles += [
            block.register_forward_pre_hook(lambda m, a: seen["input"].append(a[0])),
            block.register_forward_hook(lambda m, a, o: seen["output"].append(o)),
            block.attn.register_forward_hook(lambda m, a, o: seen["attn"].append(o[0] if isinstance(o, tuple) else o)),
            block.ls_1.register_forward_hook(lambda m, a, o: seen["ls_1"].append(o)),
            block.mlp.c_fc.register_forward_hook(lambda m, a, o: seen["c_fc"].append(o)),
            block.ls_2.register_forward_hook(lambda m, a, o: seen["ls_2"].append(o)),
        ]
        if not isinstance(block, ResidualAttentionBlock):  # torch MHA does not call out_proj as a module
            handles.append(block.attn.out_proj.register_forward_pre_hook(lambda m, a: seen["proj_in"].append(a[0])))
    try:
        seen["features"] = [tower(x)]
    finally:
        for handle in handles:
            handle.remove()
    return seen


# ---- the hooked forward ------------------------------------------------------------------
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_streams_are_open_clip_modules_outputs(cases: dict[str, Case], option: str) -> None:
    case = cases[option]
    tower, adapter = case.clip.visual, case.adapter
    assert isinstance(adapter, OpenClipAdapter)
    with torch.no_grad():
        seen = capture(tower, case.x)
        hidden = adapter.embed(case.x)
        assert close(hidden, seen["input"][0])
        for b, trace in enumerate(adapter.iter_block_traces(hidden)):
            block = tower.transformer.resblocks[b]
            assert close(trace.resid_pre, seen["input"][b])
            assert close(trace.attn_out, seen["ls_1"][b])
            assert close(trace.mlp_out, seen["ls_2"][b])
            assert close(trace.mlp_coefficients, seen["c_fc"][b])
            assert close(trace.resid_mid, seen["input"][b] + seen["ls_1"][b])
            assert close(trace.resid_post, seen["output"][b])
            out_proj = block.attn.out_proj
            if seen["proj_in"]:  # custom blocks: the coefficients are out_proj's own input
                assert close(trace.attn_coefficients, seen["proj_in"][b])
            else:  # torch MHA: its output is out_proj of the coefficients
                assert close(out_proj(trace.attn_coefficients), seen["attn"][b])
            # value vectors: out_proj / c_proj columns through the head path's linear maps
            to_features = tower.proj.T
            if tower.attn_pool is not None:
                pool = tower.attn_pool.attn
                to_features = to_features @ pool.out_proj.weight @ pool.v_proj_weight
            assert close(adapter.value_vectors(b + 1, "attn"), to_features @ out_proj.weight)
            assert close(adapter.value_vectors(b + 1, "mlp"), to_features @ block.mlp.c_proj.weight)
        assert close(adapter.model_logits(trace.resid_post), case.library_logits(case.x))
    assert adapter.anatomy.mlp_width == 256 and adapter.value_vectors(1, "mlp").shape == (EMBED, 256)


@pytest.mark.parametrize("option", DEFAULT_BLOCKS)
def test_attention_probabilities_are_torch_mha(cases: dict[str, Case], option: str) -> None:
    case = cases[option]
    tower, adapter = case.clip.visual, case.adapter
    with torch.no_grad():
        resid = adapter.embed(case.x)
        for b, trace in enumerate(adapter.iter_block_traces(resid, need_probs=True)):
            block = tower.transformer.resblocks[b]
            x = block.ln_1(trace.resid_pre)
            _, expected = block.attn(x, x, x, need_weights=True, average_attn_weights=False)
            assert trace.attn_probs.shape == (2, 2, 17, 17)
            assert close(trace.attn_probs, expected)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_parity_and_zero_shot_logits(cases: dict[str, Case], option: str) -> None:
    case = cases[option]
    result = check_parity(case.wrapper, case.x)
    assert result.logit_scale > 1.0
    assert result.ok and result.forward_error < 1e-5 and result.projection_error < 1e-5, result
    with torch.no_grad():
        expected = case.library_logits(case.x)  # s · n(encode_image(x)) · W, open_clip's zero-shot
        assert close(case.wrapper(case.x), expected)
        resid = case.adapter.run_blocks(case.adapter.embed(case.x))
        assert close(case.adapter.parity_logits(resid), expected)
        if option.startswith("tok"):  # the CLS token's projection is the zero-shot logits
            assert close(case.adapter.project(resid[:, 0]), expected)


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_projection_is_the_towers_pooling_of_one_token(cases: dict[str, Case], option: str) -> None:
    case = cases[option]
    tower, adapter = case.clip.visual, case.adapter
    hidden = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sequence = torch.stack([hidden, hidden], dim=2).reshape(12, 2, 64)  # [CLS = h, image token h]
        features = tower._pool(sequence)[0] @ tower.proj  # the tower's own pooling
        expected = F.normalize(features, dim=-1).reshape(3, 4, EMBED)
        assert close(adapter.norm_final(hidden), expected)
        assert close(adapter.project(hidden), case.wrapper.head(expected))


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_token_removal_is_the_shortened_sequence(cases: dict[str, Case], option: str) -> None:
    case = cases[option]
    tower, adapter = case.clip.visual, case.adapter
    kept = torch.tensor([[1, 4, 5, 9, 16], [2, 3, 7, 8, 12]])  # sequence positions of kept image tokens
    key_keep = torch.zeros(2, 17, dtype=torch.bool)
    key_keep[:, 0] = True
    key_keep.scatter_(1, kept, True)
    with torch.no_grad():
        hidden = adapter.embed(case.x)
        expected = []
        for i in range(2):  # open_clip's transformer and pooling on the shortened sequence
            short = torch.cat([hidden[i:i + 1, :1], hidden[i:i + 1, kept[i]]], dim=1)
            features = tower._pool(tower.transformer(short))[0] @ tower.proj
            expected.append(case.wrapper.head(F.normalize(features, dim=-1)))
        expected = torch.cat(expected)
        masked = adapter.model_logits(adapter.run_blocks(hidden, key_keep), key_keep)
        assert close(masked, expected)
        assert close(adapter.logits_keeping(hidden, kept), expected)


@pytest.mark.parametrize("option", ["tok", "custom_blocks"])
def test_lens_run_and_cls_branch(cases: dict[str, Case], option: str) -> None:
    case = cases[option]
    adapter = case.adapter
    with torch.no_grad():
        expected = case.library_logits(case.x)
    prediction = expected.argmax(-1)
    out = Lens(case.wrapper, top_k=3).run(case.x, prediction)
    assert torch.equal(out.prediction, prediction)
    last = adapter.anatomy.num_blocks
    assert (out.rank[:, last, STREAM_RESID, 0] == 0).all()  # the CLS token at the last block is the prediction
    other = (prediction + 1) % len(CLASSES)
    out = Lens(case.wrapper, top_k=3).run(case.x, other)
    higher = (expected > expected.gather(1, other[:, None])).sum(-1)
    assert torch.equal(out.rank[:, last, STREAM_RESID, 0].long(), higher)
    perturbed = Lens(case.wrapper, top_k=3).run(case.x, other, attention_perturbation="self_only",
                                                 token_keep=torch.arange(16).repeat(2, 1) % 3 != 0)
    assert torch.isfinite(perturbed.correct_logit[:, last, STREAM_RESID, 0]).all()
    assert [s for s, _ in adapter.anatomy.skipped] == (["heads"] if option == "custom_blocks" else [])
    # the generic CLS branch: the block's own CLS attention row gives back its CLS stream
    with torch.no_grad():
        trace = next(adapter.iter_block_traces(adapter.embed(case.x), need_probs=True))
        branch = adapter.cls_branch(1, trace, trace.attn_probs[:, :, 0], "resid")
        assert close(branch, trace.resid_post[:, 0])
        assert close(adapter.cls_branch(1, trace, trace.attn_probs[:, :, 0], "attn"),
                              trace.attn_out[:, 0])


def test_anatomy(cases: dict[str, Case]) -> None:
    anatomy = cases["tok"].adapter.anatomy
    assert (anatomy.family, anatomy.num_prefix_tokens) == ("open_clip", 1)
    assert (anatomy.grid_size, anatomy.token_cell) == ((4, 4), (8, 8))
    assert (anatomy.global_pool, anatomy.num_classes, anatomy.embed_dim, anatomy.num_blocks) == ("token", 5, 64, 2)
    assert cases["avg_ln_before_pool"].adapter.anatomy.global_pool == "avg"
    assert cases["attentional_pool"].adapter.anatomy.global_pool == "map"
    assert cases["custom_blocks"].adapter.anatomy.post_norm
    for option in ("avg_ln_before_pool", "attentional_pool"):
        assert cases[option].adapter.anatomy.skip_reason("explain")
    with pytest.raises(UserError, match="token grid"):
        cases["tok"].adapter.embed(images(1, 40))


# ---- refusals ----------------------------------------------------------------------------
def _wrapped(tower: nn.Module, width: int = EMBED) -> ZeroShotClassifier:
    return ZeroShotClassifier(tower, tower, width, "open_clip", nn.Linear(width, 3)).eval()


@pytest.mark.parametrize("kwargs, match", [
    (dict(pool_type="none"), "pool_type='none'"),
    (dict(attentional_pool="parallel", attn_pooler_heads=2), "attentional_pool='parallel'"),
    (dict(scaled_cosine_attn=True), "scaled cosine"),
])
def test_refused_towers(kwargs: dict, match: str) -> None:
    with torch.device("meta"):
        tower = VisionTransformer(image_size=32, patch_size=8, width=64, layers=1, heads=2, mlp_ratio=4.0,
                                  output_dim=EMBED, **kwargs)
    with pytest.raises(UserError, match=match):
        adapter_for(_wrapped(tower))


def test_refused_resnet_and_cnn_trunks_and_no_class_space() -> None:
    with torch.device("meta"):
        resnet = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=EMBED, heads=2, image_size=64, width=16)
        convnext = TimmModel("convnext_atto", embed_dim=EMBED)
        vit = VisionTransformer(image_size=32, patch_size=8, width=64, layers=1, heads=2, mlp_ratio=4.0,
                                output_dim=EMBED)
    with pytest.raises(UserError, match="ModifiedResNet.*CNN"):
        adapter_for(_wrapped(resnet))
    with pytest.raises(UserError, match="ConvNeXt trunk"):
        adapter_for(_wrapped(convnext))
    with pytest.raises(UserError, match="no class space"):
        adapter_for(ZeroShotClassifier(vit, vit, EMBED, "open_clip"))


# ---- timm trunks (SigLIP, EVA-CLIP, ...) ---------------------------------------------------
TRUNK = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def timm_tower(option: str) -> TimmModel:
    """open_clip's `TimmModel` around a tiny timm trunk (its `__init__` only takes hub names, so
    trunk and head are set as its `__init__` sets them); every parameter re-drawn."""
    torch.manual_seed(0)
    layers: OrderedDict = OrderedDict()
    if option == "siglip_map":  # ViT-*-SigLIP: map pooling, no class token, timm_proj 'none'
        trunk = TimmViT(**TRUNK, class_token=False, global_pool="map", num_classes=0, no_embed_class=True)
    elif option == "eva_token":  # EVA02-*: CLS pooling, the trunk's head is the projection
        trunk = Eva(**TRUNK, num_classes=EMBED, use_rot_pos_emb=True, ref_feat_shape=(4, 4), swiglu_mlp=True,
                    global_pool="token")
    elif option == "vit_avg_proj":  # vit_medium_patch16_gap_256: average pooling, linear proj with bias
        trunk = TimmViT(**TRUNK, class_token=False, global_pool="avg", fc_norm=True, num_classes=0, init_values=0.5)
        layers.update(drop=nn.Dropout(0.0), proj=nn.Linear(64, EMBED, bias=True))
    else:  # relpos_token_proj: vit_relpos_medium_patch16_cls_224, linear proj
        trunk = VisionTransformerRelPos(**TRUNK, class_token=True, global_pool="token", num_classes=0)
        layers.update(drop=nn.Dropout(0.0), proj=nn.Linear(64, EMBED, bias=False))
    tower = TimmModel.__new__(TimmModel)
    nn.Module.__init__(tower)
    tower.image_size, tower.trunk, tower.head = (32, 32), trunk, nn.Sequential(layers)
    redraw(tower, 1)
    return tower.eval()


TIMM_OPTIONS = ("siglip_map", "eva_token", "vit_avg_proj", "relpos_token_proj")


@pytest.fixture(scope="module")
def timm_cases() -> dict[str, ZeroShotClassifier]:
    cases = {}
    for option in TIMM_OPTIONS:
        tower = timm_tower(option)
        width = 64 if option == "siglip_map" else EMBED
        head = nn.Linear(width, len(CLASSES), bias=option == "siglip_map")  # SigLIP: logit_bias on every class
        redraw(head, 2)
        with torch.no_grad():
            head.weight.mul_(10.0)
            if head.bias is not None:
                head.bias.fill_(-2.5)
        cases[option] = ZeroShotClassifier(tower, tower, width, "open_clip", head).eval()
    return cases


@pytest.mark.parametrize("option", TIMM_OPTIONS)
def test_timm_trunk_towers(timm_cases: dict[str, ZeroShotClassifier], option: str) -> None:
    wrapper = timm_cases[option]
    tower, adapter, x = wrapper.tower, adapter_for(wrapper), images()
    assert isinstance(adapter, OpenClipTimmAdapter) and adapter.anatomy.family == "open_clip_timm"
    assert adapter.anatomy.num_classes == len(CLASSES) and adapter.anatomy.grid_size == (4, 4)
    result = check_parity(wrapper, x)
    assert result.ok and result.forward_error < 1e-5 and result.projection_error < 1e-5, result
    inputs, outputs = [], []
    for block in tower.trunk.blocks:
        block.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
        block.register_forward_hook(lambda m, a, o: outputs.append(o))
    with torch.no_grad():
        features = tower(x)  # TimmModel.forward: head(trunk(x))
        expected = wrapper.head(F.normalize(features, dim=-1))
        traces = list(adapter.iter_block_traces(adapter.embed(x)))
        for b, trace in enumerate(traces):
            assert close(trace.resid_pre, inputs[b])
            assert close(trace.resid_post, outputs[b])
        assert close(adapter.model_logits(traces[-1].resid_post), expected)
        assert close(adapter.parity_logits(traces[-1].resid_post), expected)
        # one token: the trunk's own head path on a sequence whose tokens all equal h
        hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
        sequence = hidden[:, None].expand(-1, 2, -1)
        one = F.normalize(tower.head(tower.trunk.forward_head(tower.trunk.norm(sequence))), dim=-1)
        assert close(adapter.norm_final(hidden), one)
        # value vectors: the trunk's, through the trunk's and the tower's linear heads
        block = tower.trunk.blocks[0]
        values = block.attn.proj.weight
        for layer in (tower.trunk.head, *tower.head.children()):
            if isinstance(layer, nn.Linear):
                values = layer.weight @ values
        assert close(adapter.value_vectors(1, "attn"), values)
        if option in ("siglip_map", "vit_avg_proj"):  # absolute positions: the shortened sequence is the reference
            kept = torch.tensor([[0, 3, 4, 9], [2, 5, 11, 15]])
            short = torch.stack([adapter.embed(x)[i, kept[i]] for i in range(2)])
            reference = wrapper.head(F.normalize(tower.head(tower.trunk.forward_head(
                tower.trunk.norm(tower.trunk.blocks(short)))), dim=-1))
            assert close(adapter.logits_keeping(adapter.embed(x), kept), reference)
            key_keep = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, kept, True)
            masked = adapter.model_logits(adapter.run_blocks(adapter.embed(x), key_keep), key_keep)
            assert close(masked, reference)
    pooled_cls = option in ("eva_token", "relpos_token_proj")
    assert (adapter.anatomy.skip_reason("explain") is None) == pooled_cls


# ---- preprocessing -----------------------------------------------------------------------
@pytest.mark.parametrize("size, resize_mode, interpolation", [
    (32, "shortest", "bicubic"), ((24, 40), "shortest", "bilinear"),  # non-square: open_clip resizes bicubic
    (32, "squash", "bilinear"), (48, "squash", "bicubic"),
])
def test_data_config_is_open_clips_eval_transform(size, resize_mode: str, interpolation: str) -> None:
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    preprocess = dict(size=size, mean=mean, std=std, interpolation=interpolation, resize_mode=resize_mode, fill_color=0)
    geometry = EvalGeometry.from_data_config(data_config_from_preprocess(preprocess))
    transform = open_clip.image_transform(size, is_train=False, mean=mean, std=std, resize_mode=resize_mode,
                                          interpolation=interpolation)
    rng = np.random.default_rng(0)
    for height, width in ((37, 53), (61, 29), (33, 33), (20, 90)):
        pil = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        ours, theirs = geometry.image(pil), transform(pil)
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) == 0.0  # bit-exact


def test_data_config_refuses_longest() -> None:
    preprocess = dict(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", resize_mode="longest")
    with pytest.raises(UserError, match="longest"):
        data_config_from_preprocess(preprocess)


# ---- the loader --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny architecture registered with open_clip's own `add_model_config` (a config file)."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    name = "vitlens-test-tiny"
    config = {"embed_dim": EMBED, "vision_cfg": {**VISION, "ls_init_value": 0.5}, "text_cfg": TEXT}
    (folder / f"{name}.json").write_text(json.dumps(config))
    coca = {"embed_dim": EMBED, "custom_text": True,
            "vision_cfg": {**VISION, "attentional_pool": True, "attn_pooler_queries": 3, "attn_pooler_heads": 2,
                           "output_tokens": True},
            "text_cfg": {**TEXT, "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {**TEXT, "attn_pooler_heads": 2}}
    (folder / f"{name}-coca.json").write_text(json.dumps(coca))
    open_clip.add_model_config(folder)
    return name


def test_load_checkpoint_reproduces_the_model(tiny_arch: str, tmp_path) -> None:
    model = open_clip.create_model(tiny_arch, pretrained=None)
    redraw(model, 5)
    model.eval()
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)  # open_clip's own layout: the CLIP's state dict
    loaded = load_open_clip(tiny_arch, checkpoint=str(path))
    prompts = ["a photo of a cat.", "a photo of a dog."]
    tokens = open_clip.get_tokenizer(tiny_arch)(prompts)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.model.image_features(x), model.encode_image(x))
        assert torch.equal(loaded.text(prompts), model.encode_text(tokens))
    assert loaded.logit_scale == pytest.approx(math.exp(float(model.logit_scale.detach())))
    assert loaded.logit_bias is None and loaded.model.num_classes == 0
    assert loaded.data_config["input_size"] == (3, 32, 32) and loaded.data_config["crop_mode"] == "center"
    assert "checkpoint" in loaded.description
    # open_clip's local-dir layout: config (with its preprocessing) and weights in one folder
    folder = tmp_path / "local"
    folder.mkdir()
    config = open_clip.get_model_config(tiny_arch)
    preprocess = {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash", "interpolation": "bilinear"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    for local in (load_open_clip(f"local-dir:{folder}"), load_open_clip(f"local-dir:{folder}", meta=True)):
        assert local.data_config["mean"] == (0.5, 0.5, 0.5) and local.data_config["crop_mode"] == "squash"
        assert local.data_config["interpolation"] == "bilinear"
    with torch.no_grad():
        assert torch.equal(load_open_clip(f"local-dir:{folder}").model.image_features(x), model.encode_image(x))
    # a checkpoint of another architecture is refused in one line
    other = tmp_path / "other.pt"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}, other)
    with pytest.raises(UserError, match="could not build") as err:
        load_open_clip(tiny_arch, checkpoint=str(other))
    assert "\n" not in str(err.value)


def test_random_seed_and_coca(tiny_arch: str) -> None:
    state = torch.random.get_rng_state()
    first, again = (load_open_clip(tiny_arch, random_seed=3) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    other = load_open_clip(tiny_arch, random_seed=4)
    weight = lambda lm: lm.model.tower.conv1.weight  # noqa: E731
    assert torch.equal(weight(first), weight(again)) and not torch.equal(weight(first), weight(other))
    coca = load_open_clip(f"{tiny_arch}-coca", random_seed=0)  # CoCa: output_tokens, attentional pooler
    assert isinstance(coca.model._features, PooledFeatures)
    coca.model.reset_classifier(len(CLASSES))
    with torch.no_grad():
        coca.model.head.weight.copy_(coca.logit_scale * F.normalize(coca.text(list(CLASSES)), dim=-1))
    result = check_parity(coca.model, images())
    assert result.ok, result
    assert adapter_for(coca.model).anatomy.global_pool == "map"


def test_meta_and_errors() -> None:
    start = time.perf_counter()
    meta = load_open_clip("ViT-L-14", meta=True)
    assert time.perf_counter() - start < 3.0
    assert next(meta.model.parameters()).device.type == "meta" and meta.text is None
    meta.model.reset_classifier(10)
    anatomy = adapter_for(meta.model).anatomy
    assert (anatomy.grid_size, anatomy.token_cell, anatomy.num_classes) == ((16, 16), (14, 14), 10)
    siglip = load_open_clip("ViT-B-16-SigLIP", "webli", meta=True)  # the tag's preprocessing, no download
    assert siglip.data_config["mean"] == (0.5, 0.5, 0.5) and siglip.data_config["crop_mode"] == "squash"
    assert siglip.logit_bias is not None
    siglip.model.reset_classifier(10)
    assert adapter_for(siglip.model).anatomy.global_pool == "map"
    with pytest.raises(UserError, match="unknown open_clip architecture.*list_models"):
        load_open_clip("ViT-Q-99", meta=True)
    with pytest.raises(UserError, match="no pretrained tag 'nope'.*laion2b"):
        load_open_clip("ViT-B-32", "nope")
    with pytest.raises(UserError, match="one weight source"):
        load_open_clip("ViT-B-32", "openai", random_seed=0)
    with pytest.raises(UserError, match="silently random"):
        load_open_clip("ViT-B-32")
    with pytest.raises(UserError, match="does not exist"):
        load_open_clip("ViT-B-32", checkpoint="/nonexistent/open_clip.pt")
    assert "ViT-B-32" in open_clip_architectures()


def test_real_size_vit_b32_parity() -> None:
    loaded = load_open_clip("ViT-B-32", random_seed=0)
    classes = [f"a photo of a {name}." for name in CLASSES]
    loaded.model.reset_classifier(len(CLASSES))
    with torch.no_grad():
        loaded.model.head.weight.copy_(loaded.logit_scale * F.normalize(loaded.text(classes), dim=-1))
    result = check_parity(loaded.model, images(2, 224))
    assert result.ok and result.forward_error < 1e-5 and result.projection_error < 1e-5, result


class HandFrozenLayerNorm(nn.Module):
    """LayerNorm written out, its 1/σ detached: what `ln="frozen"` must make of `ln_post`."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        scale = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + self.norm.eps).detach()
        return centred * scale * self.norm.weight + self.norm.bias


def test_frozen_final_norm_is_ln_post(cases: dict[str, Case]) -> None:
    """`ln="frozen"` detaches the scale of the tower's `ln_post` (open_clip's LayerNorm class):
    the same gradients as the live computation with `ln_post` replaced by a hand-frozen one."""
    from vitlens.explain.gradients import block_head_importance

    case = cases["tok"]
    target = torch.tensor([1, 3])
    frozen = block_head_importance(case.wrapper, case.x, target, ln="frozen")
    tower = case.clip.visual
    original = tower.ln_post
    try:
        tower.ln_post = HandFrozenLayerNorm(original)
        by_hand = block_head_importance(case.wrapper, case.x, target)
    finally:
        tower.ln_post = original
    live = block_head_importance(case.wrapper, case.x, target)
    assert close(frozen, by_hand) and not close(frozen, live)
    assert type(tower.ln_post) is original.__class__  # restored


# ---- per-head attribution (METHOD §3b) ---------------------------------------------------
@pytest.mark.parametrize("option", DEFAULT_BLOCKS)
def test_head_attribution_is_exact(cases: dict[str, Case], option: str) -> None:
    """The heads and their sources sum exactly; with CLS or mean pooling the readout is, by
    hand, `centred(w ⊙ (proj · W_y)) / σ(h) / ‖proj(ln_post(h))‖` (the L2 normalisation
    linearised at the token's own scale), and zeroing a head at `out_proj` changes the
    linearised logit by its DLA."""
    from tests.family_checks import assert_head_attribution_is_exact

    case = cases[option]
    tower = case.clip.visual
    if tower.attn_pool is not None:  # the pooler's own ln_k would stay live: not linearised, skipped
        assert "pools by attention" in case.adapter.anatomy.skip_reason("heads")
        return
    ln_post, head = tower.ln_post, case.wrapper.head

    def direction(resid: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        read = ln_post.weight * (tower.proj @ head.weight[labels].T).T  # [B, d]
        read = read - read.mean(-1, keepdim=True)
        sigma = (resid.var(-1, unbiased=False, keepdim=True) + ln_post.eps).sqrt()  # [B, T, 1]
        length = (ln_post(resid) @ tower.proj).norm(dim=-1, keepdim=True)  # [B, T, 1]
        return read[:, None, :] / sigma / length

    assert_head_attribution_is_exact(case.adapter, case.x, torch.tensor([1, 4]), direction,
                                     out_projection=lambda b: tower.transformer.resblocks[b - 1].attn.out_proj)


def test_heads_refuse_norms_around_the_merged_heads(cases: dict[str, Case]) -> None:
    """`ln_attn` (after `out_proj`) makes the block post-norm; `ln_inner` alone is refused too."""
    assert "post-norm" in cases["custom_blocks"].adapter.anatomy.skip_reason("heads")
    adapter = cases["custom_blocks"].adapter
    for block in adapter.tower.transformer.resblocks:
        assert not isinstance(block.attn.ln_inner, nn.Identity)
    with pytest.raises(UserError, match="ln_inner"):
        adapter.attention_heads(1)
