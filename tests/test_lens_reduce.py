"""Correct-class ranks, top-k and the single-class logit against brute force."""

from __future__ import annotations

import torch

from vitlens.lens import Lens
from vitlens.lens.anatomy import project
from vitlens.lens.families import adapter_for
from vitlens.lens.reduce import correct_class_logit, reduce_logits
from tests.test_lens_forward import tiny_vit


def brute_force_rank(values: list[float], correct: int) -> int:
    """Position of the first entry equal to the correct logit in a descending argsort (ties favour it)."""
    order = sorted(range(len(values)), key=lambda c: -values[c])
    target = values[correct]
    return next(position for position, c in enumerate(order) if values[c] == target)


def test_rank_equals_brute_force_argsort_with_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (6, 7, 9), generator=generator).float()  # many ties
    class_index = torch.randint(0, 9, (6,), generator=generator)
    reduction = reduce_logits(logits.clone(), class_index, top_k=5)  # it consumes its input
    for b in range(6):
        for t in range(7):
            values = logits[b, t].tolist()
            assert reduction.rank[b, t].item() == brute_force_rank(values, int(class_index[b]))
            assert reduction.correct_logit[b, t].item() == values[int(class_index[b])]
            assert reduction.topk_logit[b, t].tolist() == sorted(values, reverse=True)[:5]
            picked = reduction.topk_class[b, t].tolist()
            assert [values[c] for c in picked] == sorted(values, reverse=True)[:5]
            assert len(set(picked)) == 5
    assert reduction.rank.dtype == torch.int32
    assert reduction.topk_class.dtype == torch.int32


def test_rank_zero_iff_correct_class_is_a_maximum() -> None:
    logits = torch.tensor([[[1.0, 3.0, 3.0, 0.0], [5.0, 1.0, 2.0, 0.0]]])  # [1, 2, 4]
    reduction = reduce_logits(logits.clone(), torch.tensor([2]), top_k=2)
    assert reduction.rank.tolist() == [[0, 1]]  # tie with class 1 counts as top-1; 5 > 2 in token 2
    assert reduction.topk_class[0, 1].tolist() == [0, 2]


def test_top_k_is_capped_at_the_number_of_classes() -> None:
    reduction = reduce_logits(torch.randn(2, 3, 3), torch.tensor([0, 2]), top_k=5)
    assert reduction.topk_class.shape == (2, 3, 3)


def test_correct_class_logit_equals_full_projection() -> None:
    model = tiny_vit()
    hidden = torch.randn(3, 17, 32)
    class_index = torch.tensor([4, 0, 9])
    with torch.inference_mode():
        full = project(model, hidden)
        single = correct_class_logit(model, hidden, class_index)
    assert torch.allclose(single, full[torch.arange(3), :, class_index], atol=1e-5)


def test_streams_projected_together_equal_each_projected_alone() -> None:
    """One GEMM per block over its three streams concatenated gives each stream's own
    projection bit for bit (rows of a GEMM do not depend on the others); the peers' outputs
    (`memory_flags=False, input_logits=False`) equal the full analysis's and leave the rest
    at their fill values."""
    model = tiny_vit()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 3, 5, 7])
    full = Lens(model).run(images, labels)
    peers = Lens(model, memory_flags=False, input_logits=False).run(images, labels)
    adapter = adapter_for(model)
    with torch.inference_mode():
        for trace in adapter.iter_block_traces(adapter.embed(images)):
            for stream, hidden in enumerate((trace.resid_post, trace.attn_out, trace.mlp_out)):
                top = project(model, hidden).topk(5, dim=-1)
                for out in (full, peers):
                    assert torch.equal(out.topk_logit[:, trace.index, stream], top.values)
                    assert torch.equal(out.topk_class[:, trace.index, stream], top.indices.int())
    for name in ("rank", "correct_logit", "topk_class", "topk_logit"):
        assert torch.equal(getattr(peers, name).nan_to_num(7.0), getattr(full, name).nan_to_num(7.0))
    assert bool(peers.input_correct_logit.isnan().all()) and not bool(full.input_correct_logit[:, 1:].isnan().all())
    assert not bool(peers.key_value_agreement.any() or peers.non_compositional.any())
