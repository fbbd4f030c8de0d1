"""The Eva family adapter (`vitlens/lens/families/eva.py`) against timm's own `Eva`.

Every check compares with an independent computation: `model(x)` itself, timm's modules
captured by forward hooks, timm's unfused attention (`fused_attn = False`, probabilities
read at `attn_drop`, perturbations applied there), and timm's blocks run on the shortened
sequence with the rotary tables of the kept positions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, RmsNorm, SwiGLU
from timm.layers.pos_embed_sincos import RotaryEmbedding
from timm.models.eva import Eva, EvaBlockPostNorm

from vitlens.errors import UserError
from vitlens.explain.gradients import block_head_importance
from vitlens.lens import STREAM_RESID, Lens
from vitlens.lens.families import adapter_for
from vitlens.lens.families.eva import EvaAdapter
from vitlens.lens.parity import check_parity

from tests.family_checks import assert_usual_refusals, tiny

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
ROPE = dict(use_rot_pos_emb=True)
ARCHITECTURES: dict[str, dict] = {
    # EVA-02 tiny/small: packed SwiGLU (GluMlp), rope (cat, interleaved), GAP with fc_norm
    "eva02_glu_gap": dict(swiglu_mlp=True, mlp_ratio=4 * 2 / 3, ref_feat_shape=(2, 2), **ROPE),
    # EVA-02 base / CLIP: separate q/k/v, SwiGLU with its norm, norm before proj, CLS
    "eva02_qkv_swiglu_cls": dict(qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                                 global_pool="token", **ROPE),
    # EVA-02 enormous: post-norm blocks, no rope
    "post_norm_cls": dict(use_post_norm=True, global_pool="token"),
    "post_norm_rope_gap": dict(use_post_norm=True, init_values=0.5, **ROPE),
    # SBB rope ViTs: registers, no CLS, no absolute embedding, layer scale, no q/v bias
    "rope_reg_gap": dict(class_token=False, num_reg_tokens=2, use_abs_pos_emb=False, init_values=0.5,
                         qkv_bias=False, **ROPE),
    # RoPE-ViT mixed: a learnable table per block; APE without prefix (no_embed_class)
    "rope_mixed_ape_cls": dict(attn_type="rope", rope_type="mixed", global_pool="token", init_values=0.5,
                               no_embed_class=True, rope_grid_indexing="xy", **ROPE),
    # Perception Encoder core: AttentionRope, norm_pre, attention pooling
    "pe_core_map": dict(attn_type="rope", global_pool="map", use_pre_transformer_norm=True, rope_grid_offset=1.0,
                        rope_grid_indexing="xy", attn_pool_num_heads=2, **ROPE),
    # Perception Encoder lang / spatial: GAP, neither norm
    "pe_lang_no_norms": dict(attn_type="rope", use_pre_transformer_norm=True, use_post_transformer_norm=False,
                             use_fc_norm=False, init_values=0.5, **ROPE),
    # DINOv3: dynamic size, dinov3 rope (half layout), SwiGLU aligned, registers, norm then GAP
    "dinov3_gap": dict(dynamic_img_size=True, rope_type="dinov3", rope_rotate_half=True, rope_temperature=100,
                       num_reg_tokens=2, use_abs_pos_emb=False, use_fc_norm=False, swiglu_mlp=True,
                       swiglu_align_to=8, init_values=0.5, **ROPE),
    # Sapiens2: grouped-query attention in block 2, qk_norm, RmsNorm, attention-only layer scale
    "sapiens2_gqa_cls": dict(num_heads=4, num_kv_heads=(4, 2), attn_type="rope", qkv_fused=False, qk_norm=True,
                             global_pool="token", swiglu_mlp=True, init_values=0.5, attn_only_layer_scale=True,
                             rope_type="dinov3", rope_rotate_half=True, use_abs_pos_emb=False, num_reg_tokens=2,
                             dynamic_img_size=True, use_fc_norm=False, norm_layer=RmsNorm, **ROPE),
    # MRoPE tables (no feat_shape), max pooling
    "mrope_max": dict(attn_type="rope", rope_type="mrope", rope_mrope_section=(2, 3, 3), global_pool="max", **ROPE),
}
CLS_ARCHS = ["eva02_qkv_swiglu_cls", "rope_mixed_ape_cls", "sapiens2_gqa_cls"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU their synchronisation costs
    100x the work: run this module on one thread, then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_eva(arch: str, seed: int = 0, **overrides: object) -> Eva:
    """A tiny `Eva` with every parameter re-drawn at a scale where logits and attention are far
    from uniform (timm's init gives logits ~1e-3, too small for a parity check to mean much)."""
    return tiny(lambda: Eva(**{**TINY, **ARCHITECTURES[arch], **overrides}), seed,
                (lambda name: name.startswith("rope."), lambda p: p.mul_(4.0)))


def images_for(seed: int = 1, batch: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, 32, 32)


def unfused(model: Eva) -> Eva:
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


# ---- parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_parity_against_model_output(arch: str) -> None:
    model = tiny_eva(arch)
    assert type(adapter_for(model)) is EvaAdapter
    parity = check_parity(model, images_for())
    assert parity.logit_scale > 1.0  # a meaningful check: logits far from 0
    assert parity.forward_error < 1e-5 * parity.logit_scale
    assert parity.projection_error < 1e-5 * parity.logit_scale


def test_architectures_use_the_options_they_claim() -> None:
    """The tiny configs really exercise what the tests are named for."""
    assert type(tiny_eva("eva02_glu_gap").blocks[0].mlp) is GluMlp
    assert type(tiny_eva("eva02_qkv_swiglu_cls").blocks[0].mlp) is SwiGLU
    assert tiny_eva("eva02_qkv_swiglu_cls").blocks[0].attn.qkv is None
    assert isinstance(tiny_eva("post_norm_cls").blocks[0], EvaBlockPostNorm)
    assert tiny_eva("rope_mixed_ape_cls").rope_mixed
    assert tiny_eva("pe_core_map").attn_pool is not None
    gqa = tiny_eva("sapiens2_gqa_cls")
    assert gqa.blocks[0].attn.num_kv_groups == 1 and gqa.blocks[1].attn.num_kv_groups == 2
    assert gqa.blocks[0].gamma_1 is not None and gqa.blocks[0].gamma_2 is None
    assert type(tiny_eva("dinov3_gap").blocks[0].mlp) is SwiGLU
    assert type(tiny_eva("post_norm_cls").blocks[0].mlp) is Mlp


def test_qkv_bias_added_after_the_matmul() -> None:
    """EvaAttention's `qkv_bias_separate` (bias added to the matmul's output)."""
    model = tiny_eva("eva02_glu_gap")
    for block in model.blocks:
        block.attn.qkv_bias_separate = True
    parity = check_parity(model, images_for())
    assert parity.ok and parity.forward_error < 1e-5 * parity.logit_scale


# ---- streams vs timm's modules -----------------------------------------------------------
@pytest.mark.parametrize("arch", ["eva02_glu_gap", "eva02_qkv_swiglu_cls", "post_norm_rope_gap",
                                  "rope_mixed_ape_cls", "sapiens2_gqa_cls", "dinov3_gap"])
def test_streams_equal_timm_modules(arch: str) -> None:
    model = tiny_eva(arch)
    images = images_for()
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, pre: bool = False):
        def hook(module, args, output=None):
            captured[name] = (args[0] if pre else output).detach().clone()
        return hook

    handles = []
    for b, block in enumerate(model.blocks, start=1):
        handles += [
            block.register_forward_hook(keep(f"{b}.out")),
            block.attn.register_forward_hook(keep(f"{b}.attn")),
            block.mlp.register_forward_hook(keep(f"{b}.mlp")),
            block.norm1.register_forward_hook(keep(f"{b}.norm1")),
            block.norm2.register_forward_hook(keep(f"{b}.norm2")),
            block.attn.proj.register_forward_pre_hook(keep(f"{b}.proj_in", pre=True)),
            block.mlp.fc2.register_forward_pre_hook(keep(f"{b}.fc2_in", pre=True)),
        ]
        if type(block.mlp) is Mlp:
            handles.append(block.mlp.fc1.register_forward_hook(keep(f"{b}.fc1")))
    handles.append(model.norm_pre.register_forward_hook(keep("embed")))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    adapter = adapter_for(model)
    close = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        hidden = adapter.embed(images)
        assert torch.allclose(hidden, captured["embed"], **close)
        for trace in adapter.iter_block_traces(hidden):
            b, block = trace.index, model.blocks[trace.index - 1]
            post_norm = isinstance(block, EvaBlockPostNorm)
            if post_norm:  # the sub-layer streams after the block's own post-norms
                attn_out, mlp_out = captured[f"{b}.norm1"], captured[f"{b}.norm2"]
            else:
                attn_out = captured[f"{b}.attn"] * (1 if block.gamma_1 is None else block.gamma_1)
                mlp_out = captured[f"{b}.mlp"] * (1 if block.gamma_2 is None else block.gamma_2)
            assert torch.allclose(trace.attn_out, attn_out, **close)
            assert torch.allclose(trace.mlp_out, mlp_out, **close)
            assert torch.allclose(trace.resid_mid, trace.resid_pre + attn_out, **close)
            assert torch.allclose(trace.resid_post, captured[f"{b}.out"], **close)
            assert torch.allclose(trace.attn_coefficients, captured[f"{b}.proj_in"], **close)
            coefficients = captured[f"{b}.fc1"] if type(block.mlp) is Mlp else captured[f"{b}.fc2_in"]
            assert torch.allclose(trace.mlp_coefficients, coefficients, **close)
            assert trace.attn_out.abs().max() > 1e-2 and trace.mlp_out.abs().max() > 1e-2
            assert adapter.value_vectors(b, "attn") is block.attn.proj.weight
            assert adapter.value_vectors(b, "mlp") is block.mlp.fc2.weight


@pytest.mark.parametrize("arch", ["eva02_glu_gap", "rope_mixed_ape_cls", "sapiens2_gqa_cls", "dinov3_gap"])
def test_attention_probabilities_equal_timm_unfused(arch: str) -> None:
    model = unfused(tiny_eva(arch))
    images = images_for()
    probs: dict[int, torch.Tensor] = {}
    for b, block in enumerate(model.blocks, start=1):
        block.attn.attn_drop.register_forward_hook(lambda m, a, out, b=b: probs.__setitem__(b, out.detach().clone()))
    with torch.no_grad():
        model(images)
    adapter = adapter_for(model)
    tokens = adapter.anatomy.num_tokens
    with torch.no_grad():
        for trace in adapter.iter_block_traces(adapter.embed(images), need_probs=True):
            expected = probs[trace.index]
            assert trace.attn_probs.shape == (3, model.blocks[trace.index - 1].attn.num_heads, tokens, tokens)
            assert torch.allclose(trace.attn_probs, expected, atol=1e-6)
            assert float(expected.amax()) > 0.2  # far from uniform (1/T)


def test_rotary_tables_without_embed_equal_those_of_forward() -> None:
    """Blocks run without a preceding `embed` rebuild the same rotary tables."""
    for arch in ("eva02_glu_gap", "rope_mixed_ape_cls", "dinov3_gap", "mrope_max"):
        model = tiny_eva(arch)
        embedded = adapter_for(model)
        with torch.no_grad():
            hidden = embedded.embed(images_for())  # the tables of `_pos_embed`
            expected = embedded.run_blocks(hidden)  # timm's blocks with those tables
            fresh = adapter_for(model)  # never embedded: rebuilds its tables
            got = hidden
            for trace in fresh.iter_block_traces(hidden):
                got = trace.resid_post
        assert torch.allclose(got, expected, atol=1e-5), arch


# ---- perturbations (METHOD §4) -----------------------------------------------------------
class MaskedDrop(torch.nn.Module):
    """Stands in for `attn_drop` in timm's unfused path: multiplies the probabilities."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return probs * self.mask


@pytest.mark.parametrize("arch,perturbation", [
    ("eva02_qkv_swiglu_cls", "self_only"), ("rope_reg_gap", "self_only"), ("sapiens2_gqa_cls", "self_only"),
    ("rope_mixed_ape_cls", "no_cls"), ("pe_core_map", "self_only"),
])
def test_attention_perturbation_equals_timm_with_masked_probabilities(arch: str, perturbation: str) -> None:
    model = tiny_eva(arch)
    images, labels = images_for(), torch.tensor([1, 4, 7])
    prefix = model.num_prefix_tokens
    tokens = prefix + 16
    mask = torch.ones(tokens, tokens)  # by hand: rows are queries
    if perturbation == "self_only":
        mask[prefix:, prefix:] = torch.eye(16)
    else:
        mask[prefix:, 0] = 0.0
    perturbed = unfused(tiny_eva(arch))
    final: dict[str, torch.Tensor] = {}
    for block in perturbed.blocks:
        block.attn.attn_drop = MaskedDrop(mask)
    perturbed.blocks[-1].register_forward_hook(lambda m, a, out: final.__setitem__("x", out.detach()))
    with torch.no_grad():
        expected_logits = perturbed(images)
        unperturbed = model(images)
    assert (expected_logits - unperturbed).abs().max() > 1e-2  # the perturbation changes the output
    adapter = adapter_for(model)
    keep_mask = mask.clone()
    with torch.no_grad():
        hidden = adapter.embed(images)
        for trace in adapter.iter_block_traces(hidden, keep_mask):
            hidden = trace.resid_post
        assert torch.allclose(hidden, final["x"], atol=1e-5)
        assert torch.allclose(adapter.model_logits(hidden), expected_logits, atol=1e-5)
    out = Lens(model).run(images, labels, attention_perturbation=perturbation)
    last_logits = adapter.project(final["x"])  # [B, T, C]
    assert torch.allclose(out.correct_logit[:, -1, STREAM_RESID], last_logits[torch.arange(3), :, labels], atol=1e-4)
    assert torch.equal(out.prediction, expected_logits.argmax(dim=-1))


def test_no_cls_refused_without_class_token() -> None:
    model = tiny_eva("rope_reg_gap")
    assert adapter_for(model).anatomy.skip_reason("attn_no_cls") is not None
    with pytest.raises(UserError, match="CLS"):
        Lens(model).run(images_for(), torch.tensor([0, 1, 2]), attention_perturbation="no_cls")


def _rope_rows(model: Eva, rope: torch.Tensor | None, block: int, rows: torch.Tensor) -> torch.Tensor | None:
    """The rotary table of block `block` (0-based) restricted to image tokens `rows`."""
    if rope is None:
        return None
    if model.rope_mixed:
        return rope[block][:, rows]  # [H, n, 2 hd]
    return rope[rows]  # [n, 2 hd]


@pytest.mark.parametrize("arch", ["eva02_glu_gap", "rope_mixed_ape_cls", "dinov3_gap", "pe_core_map",
                                  "sapiens2_gqa_cls", "post_norm_rope_gap"])
def test_token_removal_equals_the_shortened_sequence(arch: str) -> None:
    """Removing image tokens = timm's blocks on the shortened sequence, each kept token rotated
    by its own position's table (built here from the model's own `_pos_embed`)."""
    model = tiny_eva(arch)
    images, labels = images_for(), torch.tensor([2, 5, 8])
    prefix = model.num_prefix_tokens
    generator = torch.Generator().manual_seed(3)
    token_keep = torch.rand(3, 16, generator=generator) < 0.5
    token_keep[:, 5] = True
    token_keep[2, :] = True
    token_keep[2, :9] = False  # images keep different numbers of tokens
    out = Lens(model).run(images, labels, token_keep=token_keep)
    adapter = adapter_for(model)
    with torch.no_grad():
        x, rope = model._pos_embed(model.patch_embed(images))
        x = model.norm_pre(x)
        for b in range(3):
            rows = token_keep[b].nonzero().squeeze(1)  # kept image tokens, in order
            short = torch.cat([x[b:b + 1, :prefix], x[b:b + 1, prefix + rows]], dim=1)
            for index, block in enumerate(model.blocks):
                short = block(short, rope=_rope_rows(model, rope, index, rows))
            logits = adapter.project(short[0])  # [P + n, C]
            positions = torch.cat([torch.arange(prefix), prefix + rows])
            got = out.correct_logit[b, -1, STREAM_RESID, positions]
            assert torch.allclose(got, logits[:, labels[b]], atol=1e-4)
            removed = prefix + (~token_keep[b]).nonzero().squeeze(1)
            assert not out.token_present[b, removed].any() and out.token_present[b, positions].all()
            expected = model.forward_head(model.norm(short))  # the model's output on the short sequence
            assert out.prediction[b] == expected.argmax()
            hidden = adapter.embed(images[b:b + 1])
            kept = (prefix + rows)[None]
            assert torch.allclose(adapter.logits_keeping(hidden, kept), expected, atol=1e-4)


# ---- Lens end to end ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["eva02_qkv_swiglu_cls", "eva02_glu_gap", "pe_core_map", "dinov3_gap"])
def test_lens_run_end_to_end(arch: str) -> None:
    model = tiny_eva(arch)
    images, labels = images_for(), torch.tensor([0, 3, 9])
    expected = model(images)
    out = Lens(model).run(images, labels)
    anatomy = adapter_for(model).anatomy
    assert out.rank.shape == (3, 3, 3, anatomy.num_tokens)
    assert torch.equal(out.prediction, expected.argmax(dim=-1))
    assert (out.rank[:, 1:] >= 0).all() and (out.rank[:, 0, 1:] == -1).all()
    if anatomy.pools_class_token:
        assert torch.allclose(out.correct_logit[:, -1, STREAM_RESID, 0], expected[torch.arange(3), labels], atol=1e-4)
    with torch.no_grad():
        final = adapter_for(model).run_blocks(adapter_for(model).embed(images))
        normed = model.norm(final)
        if model.attn_pool is not None:  # by hand: the attention pool on each one-token sequence
            pooled = torch.stack([model.attn_pool(normed[:, t:t + 1]) for t in range(normed.shape[1])], dim=1)
        else:
            pooled = normed
        by_hand = model.head(model.fc_norm(pooled))  # [B, T, C]
    assert torch.allclose(out.correct_logit[:, -1, STREAM_RESID], by_hand[torch.arange(3), :, labels], atol=1e-4)


def test_explain_gradients_on_a_rope_cls_model() -> None:
    """METHOD §6 on a rotary CLS model: block b's importance = -dCE(head(norm(cls_b)))/da_b[cls],
    from timm's own unfused forward with a leaf CLS row swapped in at `attn_drop`."""
    model = tiny_eva("rope_mixed_ape_cls")
    images, labels = images_for(batch=2), torch.tensor([1, 6])
    importance = block_head_importance(model, images, labels)  # [B, L, H, N]
    reference = unfused(tiny_eva("rope_mixed_ape_cls"))
    for b in range(2):
        captured: dict[str, torch.Tensor] = {}

        class SwapCls(torch.nn.Module):
            def forward(self, probs: torch.Tensor) -> torch.Tensor:
                leaf = probs[:, :, 0].detach().clone().requires_grad_(True)
                captured["leaf"] = leaf
                return torch.cat([leaf[:, :, None], probs[:, :, 1:].detach()], dim=2)

        drop = reference.blocks[b].attn.attn_drop
        reference.blocks[b].attn.attn_drop = SwapCls()
        with torch.no_grad():
            x, rope = reference._pos_embed(reference.patch_embed(images))
            for index in range(b):
                x = reference.blocks[index](x, rope=rope[index])
        with torch.enable_grad():
            out = reference.blocks[b](x, rope=rope[b])
            loss = F.cross_entropy(reference.head(reference.norm(out[:, 0])), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, captured["leaf"])
        reference.blocks[b].attn.attn_drop = drop
        assert torch.allclose(importance[:, b], -grad[:, :, 1:], atol=1e-5)
        assert grad.abs().max() > 1e-4


def test_explain_skipped_unless_the_head_reads_cls() -> None:
    for arch in ("eva02_glu_gap", "pe_core_map", "rope_reg_gap"):
        reason = adapter_for(tiny_eva(arch)).anatomy.skip_reason("explain")
        assert reason is not None and "global_pool" in reason
    for arch in CLS_ARCHS:
        assert adapter_for(tiny_eva(arch)).anatomy.skip_reason("explain") is None
    with pytest.raises(UserError, match="explainability does not apply"):
        block_head_importance(tiny_eva("eva02_glu_gap"), images_for(batch=1), torch.tensor([0]))


# ---- anatomy and refusals ----------------------------------------------------------------
def test_anatomy() -> None:
    anatomy = adapter_for(tiny_eva("sapiens2_gqa_cls")).anatomy
    assert anatomy.family == "eva" and anatomy.num_prefix_tokens == 3 and anatomy.has_class_token
    assert anatomy.grid_size == (4, 4) and anatomy.token_cell == (8, 8) and anatomy.num_tokens == 19
    gap = adapter_for(tiny_eva("rope_reg_gap")).anatomy
    assert gap.num_prefix_tokens == 2 and not gap.has_class_token and gap.is_gap
    assert adapter_for(tiny_eva("pe_core_map")).anatomy.global_pool == "map"
    assert adapter_for(tiny_eva("post_norm_cls")).anatomy.post_norm


def test_refusals_name_what_does_not_apply() -> None:
    assert_usual_refusals(lambda **options: Eva(**{**TINY, **options}))
    model = tiny_eva("eva02_glu_gap")
    model.blocks[1].mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))
    with pytest.raises(UserError, match="block 2: unsupported MLP Sequential"):
        adapter_for(model)
    model = tiny_eva("eva02_glu_gap")
    model.blocks[0].attn = torch.nn.Identity()
    with pytest.raises(UserError, match="block 1: unsupported attention Identity"):
        adapter_for(model)
    model = tiny_eva("eva02_glu_gap")
    model.rope = RotaryEmbedding(dim=16, feat_shape=[4, 4])
    with pytest.raises(UserError, match="unsupported rotary embedding RotaryEmbedding"):
        adapter_for(model)
    model = tiny_eva("pe_core_map")
    model.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(17, 32))
    with pytest.raises(UserError, match="own position embedding"):
        adapter_for(model)
    model = tiny_eva("dinov3_gap")  # dynamic size: another input gives another token grid
    with pytest.raises(UserError, match="analyses the model at that size"):
        adapter_for(model).embed(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("arch", ["rope_mixed_ape_cls", "dinov3_gap", "sapiens2_gqa_cls", "pe_core_map"])
def test_bf16_forward_runs_and_mostly_agrees(arch: str) -> None:
    """`Lens(precision="bf16")`: the rotary tables (fp32) meet bf16 queries as in timm's autocast
    forward; the tables keep their slots and mostly agree with fp32."""
    model = tiny_eva(arch)
    images, labels = images_for(batch=4), torch.tensor([1, 5, 9, 2])
    reference = Lens(model).run(images, labels)
    out = Lens(model, precision="bf16").run(images, labels)
    assert torch.equal(out.rank == -1, reference.rank == -1)
    exists = reference.rank >= 0
    agreement = (out.topk_class[..., 0] == reference.topk_class[..., 0])[exists].float().mean()
    assert agreement > 0.8
    assert not torch.equal(out.correct_logit[exists], reference.correct_logit[exists])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(images).float()  # timm's own bf16 forward
    assert torch.equal(out.prediction, expected.argmax(dim=-1))
