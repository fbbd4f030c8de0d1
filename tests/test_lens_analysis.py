"""Every field of a `LensBatch` against a brute-force recomputation from hooks on plain timm."""

from __future__ import annotations

import pytest
import torch

from vitlens.errors import UserError
from vitlens.lens import STREAM_ATTN, STREAM_MLP, STREAM_RESID, Lens
from tests.test_lens_forward import tiny_vit
from tests.test_lens_reduce import brute_force_rank

TOP_K = 5


def capture_streams(model: torch.nn.Module, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Streams and memory coefficients recorded with forward hooks during timm's own forward."""
    record: dict[str, list[torch.Tensor]] = {k: [] for k in ("resid", "attn", "mlp", "attn_coef", "mlp_coef")}
    hooks = [model.norm_pre.register_forward_hook(lambda m, i, o: record["resid"].append(o))]
    for block in model.blocks:
        hooks += [
            block.register_forward_hook(lambda m, i, o: record["resid"].append(o)),
            block.ls1.register_forward_hook(lambda m, i, o: record["attn"].append(o)),
            block.ls2.register_forward_hook(lambda m, i, o: record["mlp"].append(o)),
            block.mlp.fc1.register_forward_hook(lambda m, i, o: record["mlp_coef"].append(o)),
            block.attn.proj.register_forward_pre_hook(lambda m, i: record["attn_coef"].append(i[0])),
        ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return record


def top_indices(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values (brute force)."""
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


def test_lens_batch_matches_brute_force() -> None:
    model = tiny_vit(init_values=0.3)
    images = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([2, 5, 8])
    out = Lens(model, top_k=TOP_K).run(images, labels)
    streams = capture_streams(model, images)
    project = lambda h: model.head(model.norm(h))  # noqa: E731 - METHOD §1 for a CLS model
    E = model.head.weight.detach()
    with torch.no_grad():
        for block in range(model.blocks.__len__() + 1):
            kinds = [(STREAM_RESID, streams["resid"][block])]
            if block:
                kinds += [(STREAM_ATTN, streams["attn"][block - 1]), (STREAM_MLP, streams["mlp"][block - 1])]
            for stream, hidden in kinds:
                logits = project(hidden)
                for b in range(3):
                    c = int(labels[b])
                    for t in range(17):
                        values = logits[b, t].tolist()
                        assert out.rank[b, block, stream, t].item() == brute_force_rank(values, c)
                        assert out.correct_logit[b, block, stream, t].item() == pytest.approx(values[c], abs=1e-5)
                        assert out.topk_class[b, block, stream, t].tolist() == top_indices(values, TOP_K)
            if not block:
                assert bool((out.rank[:, 0, 1:] == -1).all())
                continue
            resid_in = streams["resid"][block - 1]
            attn_out = streams["attn"][block - 1]
            inputs = {STREAM_ATTN: project(resid_in), STREAM_MLP: project(resid_in + attn_out)}
            layer = model.blocks[block - 1]
            values = {STREAM_ATTN: layer.attn.proj.weight, STREAM_MLP: layer.mlp.fc2.weight}
            coefficients = {STREAM_ATTN: streams["attn_coef"][block - 1], STREAM_MLP: streams["mlp_coef"][block - 1]}
            outputs = {STREAM_ATTN: project(attn_out), STREAM_MLP: project(streams["mlp"][block - 1])}
            for stream in (STREAM_ATTN, STREAM_MLP):
                memory_logits = E @ values[stream]  # [C, M]
                memory_class = memory_logits.argmax(dim=0).tolist()
                for b in range(3):
                    c = int(labels[b])
                    class_memories = set(top_indices(memory_logits[c].tolist(), TOP_K))
                    for t in range(17):
                        expected_input = inputs[stream][b, t, c].item()
                        got_input = out.input_correct_logit[b, block, stream, t].item()
                        assert got_input == pytest.approx(expected_input, abs=1e-4)
                        token_memories = top_indices(coefficients[stream][b, t].tolist(), TOP_K)
                        agree = bool(class_memories & set(token_memories))
                        assert out.key_value_agreement[b, block, stream, t].item() == agree
                        top1 = int(outputs[stream][b, t].argmax())
                        non_compositional = any(memory_class[m] == top1 for m in token_memories)
                        assert out.non_compositional[b, block, stream, t].item() == non_compositional


def test_lens_rejects_unsupported_models() -> None:
    model = tiny_vit(attn_layer="diff")
    with pytest.raises(UserError, match="block 1: unsupported attention DiffAttention"):
        Lens(model)
    with pytest.raises(UserError, match="no adapter for Linear"):
        Lens(torch.nn.Linear(3, 3))  # type: ignore[arg-type]


def test_lens_outputs_stay_on_device_and_move_once() -> None:
    out = Lens(tiny_vit()).run(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    moved = out.to("cpu")
    assert moved.rank.shape == (2, 3, 3, 17) and moved.topk_class.shape == (2, 3, 3, 17, 5)
    assert moved.num_blocks == 2 and moved.num_prefix_tokens == 1


def test_labels_outside_the_model_label_space_are_a_user_error() -> None:
    lens = Lens(tiny_vit())
    with pytest.raises(UserError, match=r"\[0, 10\)"):
        lens.run(torch.randn(2, 3, 32, 32), torch.tensor([3, 10]))
    with pytest.raises(UserError, match="one label"):
        lens.run(torch.randn(2, 3, 32, 32), torch.tensor([3]))
