"""Checks the family adapter tests share (`tests/test_family_*.py`, `tests/test_lens_forward.py`).

Every expectation here comes from the library's own modules — `model(x)`, forward hooks on
its blocks and submodules, its unfused attention with the probabilities read (or edited) at
`attn_drop`, its own blocks and head, autograd through them — never from vitlens itself.
A family's test builds its tiny models (`tiny`, `redraw`) and calls these with what is its
own (how its blocks take a shared bias, which submodule gives a stream).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block as VitBlock

from vitlens.data.token_labels import LABEL_CONTEXT, LABEL_PREFIX
from vitlens.errors import UserError
from vitlens.explain.gradients import block_head_importance
from vitlens.lens import STREAM_RESID, Lens, LensBatch, adapter_for
from vitlens.lens.families.base import ModelAdapter
from vitlens.lens.parity import ParityResult, check_parity
from vitlens.lens.reduce import reduce_logits
from vitlens.store.records import tokens_table

#: (does this parameter name match, re-draw the parameter in place)
Rule = tuple[Callable[[str], bool], Callable[[torch.Tensor], object]]


# ---- tiny models and inputs --------------------------------------------------------------
def redraw(model: torch.nn.Module, *rules: Rule) -> torch.nn.Module:
    """Every parameter re-drawn at a scale where attention and logits are far from uniform
    (timm's inits — 1e-3 heads, 1e-6 layer scales, zero bias tables — would hide whole
    branches): norm weights U(0.5, 1.5), then the first of the family's `rules` that matches,
    else N(0, 0.3)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.uniform_(0.5, 1.5)
                continue
            for matches, draw in rules:
                if matches(name):
                    draw(parameter)
                    break
            else:
                parameter.normal_(0.0, 0.3)
    return model


def tiny(build: Callable[[], torch.nn.Module], seed: int = 0, *rules: Rule) -> torch.nn.Module:
    """`build()` under `seed`, in eval mode, re-drawn (`redraw`)."""
    torch.manual_seed(seed)
    return redraw(build().eval(), *rules)


def images(batch: int = 2, seed: int = 1, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    """# -> [B, 3, H, W], the same for the same seed"""
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# ---- the library's own forward -----------------------------------------------------------
@contextmanager
def recording(points: dict[str, Iterable[torch.nn.Module]], inputs: Iterable[str] = ()) -> Iterator[dict]:
    """Forward hooks recording, per name in `points`, the output of every module listed under
    it (for names in `inputs`: its first input), in call order; removed on exit.

    # -> {name: [tensor per call]}
    """
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in points}
    inputs, handles = set(inputs), []
    for name, modules in points.items():
        record = seen[name].append
        for module in modules:
            if name in inputs:
                handles.append(module.register_forward_pre_hook(lambda _m, args, record=record: record(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda _m, _a, out, record=record: record(out)))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def seen_in_forward(model: torch.nn.Module, x: torch.Tensor, points: dict[str, torch.nn.Module],
                    inputs: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """`model(x)` (no grad) with the output of each module in `points` (for names in `inputs`:
    its first input) at its first call. # -> {name: tensor}"""
    with recording({name: [module] for name, module in points.items()}, inputs) as seen, torch.no_grad():
        model(x)
    return {name: values[0] for name, values in seen.items()}


def timm_with_probs(blocks: Iterable[torch.nn.Module], edit: Callable[[torch.Tensor], torch.Tensor | None]) -> list:
    """timm's attention switched to its unfused path, `edit(probs)` given (and, when it returns
    a tensor, replacing) the output of every block's `attn_drop`: the post-softmax attention.
    timm's own modules then compute the edited forward. # -> the hook handles"""
    handles = []
    for block in blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda _m, _a, out: edit(out)))
    return handles


# ---- checks ------------------------------------------------------------------------------
def assert_parity(model: torch.nn.Module, x: torch.Tensor) -> ParityResult:
    """The hooked forward and the projection both equal `model(x)`, on logits far from zero."""
    result = check_parity(model, x)
    assert result.logit_scale > 1.0  # the logits are not trivially small
    assert result.ok, result
    assert result.forward_error < 1e-5 and result.projection_error < 1e-5
    return result


def assert_projects_as_pooled_head(model: torch.nn.Module, width: int, count: int) -> None:
    """`project(h)` is timm's head on a sequence whose every token is `h` (CLS pooling reads
    it, the mean of copies is it), for `count` random tokens."""
    adapter = adapter_for(model)
    hidden = torch.randn(3, count, width)
    with torch.no_grad():
        for t in range(count):
            h = hidden[:, t]  # [3, d]
            sequence = h[:, None].expand(-1, model.num_prefix_tokens + 16, -1)
            expected = model.forward_head(model.norm(sequence))
            assert torch.allclose(adapter.project(h), expected, atol=1e-5)


def assert_streams_are(adapter: ModelAdapter, x: torch.Tensor, seen: dict) -> None:
    """Every stream of every block equals what timm's modules gave in `seen`: per block its
    `input` and `output`, what each sub-layer adds (`attn_add`, `mlp_add`), the input of
    `attn.proj` (`proj_in`), `fc1`'s output (`fc1`, where the MLP has one); then `logits`."""
    model = adapter.model
    with torch.no_grad():
        hidden = adapter.embed(x)
        assert torch.allclose(hidden, seen["input"][0], atol=1e-6)
        for b, trace in enumerate(adapter.iter_block_traces(hidden)):
            block = model.blocks[b]
            assert torch.allclose(trace.resid_pre, seen["input"][b], atol=1e-5)
            assert torch.allclose(trace.attn_out, seen["attn_add"][b], atol=1e-5)
            assert torch.allclose(trace.attn_coefficients, seen["proj_in"][b], atol=1e-5)
            assert torch.allclose(trace.resid_mid, seen["input"][b] + seen["attn_add"][b], atol=1e-5)
            assert torch.allclose(trace.mlp_out, seen["mlp_add"][b], atol=1e-5)
            if seen["fc1"]:
                assert torch.allclose(trace.mlp_coefficients, seen["fc1"][b], atol=1e-5)
            assert torch.allclose(trace.resid_post, seen["output"][b], atol=1e-5)
            assert adapter.value_vectors(b + 1, "attn") is block.attn.proj.weight
            assert adapter.value_vectors(b + 1, "mlp") is block.mlp.fc2.weight
        assert torch.allclose(adapter.model_logits(trace.resid_post), seen["logits"][0], atol=1e-5)


def assert_probs_are_timms_unfused(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The adapter's attention probabilities are timm's unfused ones (at `attn_drop`), and its
    blocks give `model(x)`. # -> timm's probabilities per block [B, H, T, T]"""
    adapter = adapter_for(model)
    tokens = model.num_prefix_tokens + 16
    recorded: list[torch.Tensor] = []
    timm_with_probs(model.blocks, recorded.append)
    with torch.no_grad():
        expected = model(x)
        resid = adapter.embed(x)
        for b, trace in enumerate(adapter.iter_block_traces(resid, need_probs=True)):
            assert trace.attn_probs.shape == (x.shape[0], block_heads(model), tokens, tokens)
            assert torch.allclose(trace.attn_probs, recorded[b], atol=1e-6)
            resid = trace.resid_post
        assert torch.allclose(adapter.model_logits(resid), expected, atol=1e-5)
    return recorded


def block_heads(model: torch.nn.Module) -> int:
    """The attention heads of block 1."""
    return model.blocks[0].attn.num_heads


def assert_keep_mask_is_timms(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> tuple:
    """Every block's output under `keep_mask=mask` equals timm's own blocks with their
    probabilities multiplied by `mask` at `attn_drop`, and so does the output.

    # -> (timm's perturbed logits [B, C], its block outputs [B, T, d] per block)
    """
    adapter = adapter_for(model)
    with recording({"output": model.blocks}) as seen:
        handles = timm_with_probs(model.blocks, lambda probs: probs * mask)
        with torch.no_grad():
            expected = model(x)
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        resid = adapter.embed(x)
        for b, trace in enumerate(adapter.iter_block_traces(resid, keep_mask=mask)):
            assert torch.allclose(trace.resid_post, seen["output"][b], atol=1e-5)
            resid = trace.resid_post
        assert torch.allclose(adapter.model_logits(resid), expected, atol=1e-5)
    return expected, seen["output"]


def assert_explain_gradients_are_timms(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                                       **block_kwargs: object) -> None:
    """METHOD §6 per block: the importance is -dCE(head(norm(block output)))/d(CLS row), by
    autograd through timm's own block (unfused, a leaf CLS row swapped in at `attn_drop`) on
    the input timm's forward gives it (`block_kwargs`: what the model passes every block)."""
    importance = block_head_importance(model, x, labels)  # [B, L, H, N]
    assert importance.shape == (x.shape[0], len(model.blocks), block_heads(model), 16)
    with recording({"input": model.blocks}, inputs={"input"}) as seen:
        model(x)
    for b, block in enumerate(model.blocks):
        leaves: list[torch.Tensor] = []

        def leaf_row(_m, _a, probs: torch.Tensor) -> torch.Tensor:
            row = probs[:, :, 0].detach().clone().requires_grad_(True)
            leaves.append(row)
            return torch.cat([row[:, :, None], probs[:, :, 1:].detach()], dim=2)

        block.attn.fused_attn = False
        handle = block.attn.attn_drop.register_forward_hook(leaf_row)
        out = block(seen["input"][b].detach(), **block_kwargs)
        handle.remove()
        loss = F.cross_entropy(model.forward_head(model.norm(out)), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaves[0])
        assert torch.allclose(importance[:, b], -grad[:, :, 1:], atol=1e-5)
        assert grad.abs().max() > 1e-4


def assert_lens_resid_is_timms(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, seen: dict,
                               token_logits: Callable[[torch.Tensor], torch.Tensor]) -> LensBatch:
    """`Lens.run`'s residual stream at every block slot is `token_logits` (each token alone
    through timm's head) of timm's block inputs / outputs in `seen` (`capture`-style lists):
    the correct-class logit and its rank; its prediction is timm's (`seen["logits"]`).

    # token_logits: [B, T, d] -> [B, T, C]; -> the LensBatch
    """
    out = Lens(model).run(x, labels)
    rows = torch.arange(len(labels))
    assert out.rank.shape == (len(labels), len(model.blocks) + 1, 3, model.num_prefix_tokens + 16)
    assert torch.equal(out.prediction, seen["logits"][0].argmax(-1))
    with torch.no_grad():
        for slot in range(len(model.blocks) + 1):
            hidden = seen["input"][0] if slot == 0 else seen["output"][slot - 1]
            logits = token_logits(hidden)  # [B, T, C]
            correct = logits[rows, :, labels]  # [B, T]
            assert torch.allclose(out.correct_logit[:, slot, STREAM_RESID], correct, atol=1e-4)
            assert torch.equal(out.rank[:, slot, STREAM_RESID].long(), (logits > correct[..., None]).sum(-1))
    return out


def assert_usual_refusals(build: Callable[..., torch.nn.Module]) -> None:
    """The one-line refusals of a timm family whose blocks are checked by class: `build(**options)`
    without pooling (`global_pool=''`), headless (`num_classes=0`), and with a ViT `Block` as
    block 2."""
    with pytest.raises(UserError, match="global_pool=''"):
        adapter_for(build(global_pool=""))
    with pytest.raises(UserError, match="headless"):
        adapter_for(build(num_classes=0))
    model = build()
    model.blocks[1] = VitBlock(model.embed_dim, 2)
    with pytest.raises(UserError, match="block 2: unsupported transformer block Block"):
        adapter_for(model)


# ---- class-attention families (CaiT, XCiT) -----------------------------------------------
def assert_class_attention_anatomy(model: torch.nn.Module, family: str, depth: int, class_depth: int) -> None:
    """`depth` blocks then `class_depth` class-attention blocks; the CLS from the first of
    those; one prefix token; a 4 x 4 grid of 8-pixel tokens."""
    anatomy = adapter_for(model).anatomy
    assert (anatomy.family, anatomy.num_blocks, anatomy.cls_from_block) == (family, depth + class_depth, depth + 1)
    assert (anatomy.num_prefix_tokens, anatomy.num_tokens) == (1, 17)
    assert (anatomy.grid_size, anatomy.token_cell) == ((4, 4), (8, 8))


def assert_cls_only_from_class_attention(model: torch.nn.Module, x: torch.Tensor, depth: int,
                                         class_depth: int) -> None:
    """`Lens.run` and the tokens table have no CLS rows before the class-attention blocks and no
    image-token sub-layer rows in them; the last CLS is the model's output (by an independent
    reduction of `model(x)`)."""
    tokens, labels = 17, torch.tensor([3, 7])
    out = Lens(model).run(x, labels)
    assert out.rank.shape == (2, depth + class_depth + 1, 3, tokens)
    cls, image = out.rank[:, :, :, 0], out.rank[:, :, :, 1:]
    assert bool((cls[:, : depth + 1] == -1).all())  # slots 0..D: no CLS yet, in any stream
    assert bool((cls[:, depth + 1 :] >= 0).all())
    assert bool((image[:, :, 0] >= 0).all())  # image tokens' residual stream at every slot
    assert bool((image[:, 1 : depth + 1, 1:] >= 0).all())
    assert bool((image[:, depth + 1 :, 1:] == -1).all())  # class attention: sub-layers update only the CLS
    assert bool(torch.isnan(out.input_correct_logit[:, depth + 1 :, 1:, 1:]).all())
    with torch.no_grad():
        logits = model(x)
    expected = reduce_logits(logits[:, None].clone(), labels, 5)
    assert torch.equal(out.rank[:, -1, 0, 0], expected.rank[:, 0])
    torch.testing.assert_close(out.correct_logit[:, -1, 0, 0], expected.correct_logit[:, 0])
    assert torch.equal(out.prediction, logits.argmax(dim=1))

    token_label = torch.full((2, tokens), LABEL_CONTEXT, dtype=torch.int8)
    token_label[:, 0] = LABEL_PREFIX
    rows = tokens_table(out, ["a", "b"], torch.zeros(2, tokens), token_label, has_class_token=True).to_pylist()
    cls_rows = [r for r in rows if r["token"] == 0]
    assert {r["block"] for r in cls_rows} == set(range(depth + 1, depth + class_depth + 1))
    assert all(r["token_kind"] == "cls" for r in cls_rows)
    assert not [r for r in rows if r["token"] > 0 and r["stream"] != "resid" and r["block"] > depth]
    per_image_tokens = (tokens - 1) * ((depth + class_depth + 1) + 2 * depth)
    assert len(rows) == 2 * (class_depth * 3 + per_image_tokens)


def timm_block_outputs(model: torch.nn.Module, x: torch.Tensor, blocks: Iterable[torch.nn.Module]) -> tuple:
    """timm's own forward with every block's output recorded, and the adapter's traces.

    # -> (block outputs per block, BlockTrace per block)
    """
    with recording({"output": blocks}) as seen, torch.no_grad():
        model(x)
    with torch.no_grad():
        adapter = adapter_for(model)
        traces = list(adapter.iter_block_traces(adapter.embed(x)))
    return seen["output"], traces


# ---- per-head attribution (METHOD §3b) -------------------------------------------------------
Direction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def layer_norm_direction(norm: torch.nn.Module, rows: Callable[[torch.Tensor], torch.Tensor]) -> Direction:
    """METHOD §3b's linearised readout by hand for a head path `rows(y) · norm(h)` with one
    LayerNorm: `u = centred(w ⊙ E_y) / σ(h)` (σ with the norm's eps; no biases).

    # -> direction(resid [B, T, d], labels [B]) -> u [B, T, d]
    """
    def direction(resid: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        read = norm.weight * rows(labels)  # [B, d]
        read = read - read.mean(-1, keepdim=True)
        sigma = (resid.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()  # [B, T, 1]
        return read[:, None, :] / sigma
    return direction


def assert_head_attribution_is_exact(
    adapter: ModelAdapter,
    x: torch.Tensor,
    labels: torch.Tensor,
    direction: Direction | None = None,
    out_projection: Callable[[int], torch.nn.Module] | None = None,
    tol: float = 1e-4,
) -> object:
    """The §3b identities on `x`: the heads' DLAs plus the bias term sum to the attention
    stream's linearised logit per token; each head's source terms sum to its DLA (and the CLS
    map to the CLS's DLA); with `direction` (the readout by hand), the attention stream's
    linearised logit is `attn_out · u`; with `out_projection(b)` (the module whose input holds
    the heads), zeroing head h's slice there changes that logit by exactly `DLA_h`.

    # x: [B, 3, H, W], labels: [B] -> HeadBatch
    """
    from vitlens.lens.heads import head_attribution

    tokens = adapter.anatomy.num_tokens
    token_label = torch.arange(tokens).remainder(3)[None].expand(x.shape[0], -1).clone()  # context/class/ignore
    token_label[:, : adapter.anatomy.num_prefix_tokens] = LABEL_PREFIX
    heads = head_attribution(adapter, x, labels, token_label)
    present = ~heads.attn_dla.isnan()  # [B, L, T]
    assert bool(present.any())
    scale = max(1.0, float(heads.attn_dla[present].abs().max()))
    total = heads.dla.sum(2) + heads.bias_dla
    assert float((total - heads.attn_dla)[present].abs().max()) <= tol * scale
    cover = present[:, :, None].expand_as(heads.dla)
    assert float((heads.source_dla.sum(-1) - heads.dla)[cover].abs().max()) <= tol * scale
    assert bool((heads.source_abs.sum(-1)[cover] >= heads.source_dla.sum(-1)[cover].abs() - tol * scale).all())
    if heads.has_class_token:
        cls = ~heads.dla[:, :, :, 0].isnan()  # [B, L, H]
        assert float((heads.cls_source.nansum(-1) - heads.dla[:, :, :, 0])[cls].abs().max()) <= tol * scale
    if direction is None:
        return heads
    with torch.no_grad():
        traces = list(adapter.iter_block_traces(adapter.embed(x)))
        for trace in traces:
            b, span = trace.index - 1, slice(trace.first_token, trace.first_token + trace.attn_out.shape[1])
            u = direction(trace.resid_post, labels)[:, : trace.attn_out.shape[1]]  # [B, S, d]
            by_hand = (u * trace.attn_out).sum(-1)
            assert float((by_hand - heads.attn_dla[:, b, span]).abs().max()) <= tol * scale
            if out_projection is None:
                continue
            width = trace.attn_coefficients.shape[-1] // heads.num_heads
            for h in range(heads.num_heads):
                def zero_head(module: torch.nn.Module, args: tuple, h: int = h) -> tuple:
                    edited = args[0].clone()
                    edited[..., h * width:(h + 1) * width] = 0
                    return (edited, *args[1:])

                handle = out_projection(trace.index).register_forward_pre_hook(zero_head)
                try:
                    without = adapter.block_forward(trace.index, trace.resid_pre).attn_out
                finally:
                    handle.remove()
                change = (u * (trace.attn_out - without)).sum(-1)  # [B, S]
                assert float((change - heads.dla[:, b, h, span]).abs().max()) <= tol * scale
    return heads
