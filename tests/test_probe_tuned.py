"""The tuned lens: `AffineAccumulator` and the fitted maps against numpy ridge solves (and
least squares with an intercept column for a vanishing alpha), streaming against one batch,
block L against the lens and the model's own output, tuned ranks against brute force (full
logits, comparison count) on CLS, GAP and CaiT models, and the shots selection by hand."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import torch
from timm.models.cait import Cait

from vitlens.lens import STREAM_RESID, Lens, adapter_for
from vitlens.lens.families.base import ModelAdapter
from vitlens.probe import (
    AffineAccumulator,
    TunedLens,
    affine_memory_bytes,
    fit_tuned_lens,
    probe_slots,
    token_features,
    tuned_memory_bytes,
)
from tests.test_lens_forward import tiny_vit as lens_tiny_vit
from tests.test_probe_fit import CLASSES, DEPTH, GRID, WIDTH, stream_of, tiny_vit
from tests.test_probe_ridge import problem

T = 1 + GRID * GRID


def tiny_model(kind: str) -> torch.nn.Module:
    """A tiny CLS ViT (LayerScale), GAP ViT (no class token, average pooling) or CaiT (the CLS
    token joins in its one class-attention block: L = DEPTH + 1)."""
    if kind == "cls":
        return tiny_vit()
    if kind == "gap":
        return lens_tiny_vit(0, embed_dim=WIDTH, depth=DEPTH, num_classes=CLASSES, class_token=False,
                             global_pool="avg")
    torch.manual_seed(0)
    return Cait(img_size=32, patch_size=8, embed_dim=WIDTH, depth=DEPTH, depth_token_only=1, num_heads=2,
                num_classes=CLASSES, init_values=0.5).eval()


def draw(count: int, seed: int) -> torch.Tensor:
    """# -> images [count, 3, 32, 32]"""
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def resid_streams(adapter: ModelAdapter, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The residual stream at block slots 0..L, float64.

    # images: [B, 3, H, W] -> (streams [B, L+1, T, d], present [L+1, T] bool)
    """
    features, present = token_features(adapter, images, probe_slots(adapter.anatomy.num_blocks, ("resid",)))
    return features.double().numpy(), present.numpy()


def numpy_maps(streams: np.ndarray, present: np.ndarray, alpha: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per block slot b < L, ridge from slot b's tokens to slot L's (centred X and Y,
    intercept unpenalised), over the tokens present at both.

    # streams: [B, L+1, T, d], present: [L+1, T] -> [(W [d, d], c [d])] * L
    """
    last = streams.shape[1] - 1
    maps = []
    for b in range(last):
        tokens = present[b] & present[last]
        dim = streams.shape[-1]
        x, y = streams[:, b, tokens].reshape(-1, dim), streams[:, last, tokens].reshape(-1, dim)
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
        maps.append((w, y_mean - x_mean @ w))
    return maps


def test_affine_accumulator_equals_numpy_with_mask_and_offset() -> None:
    """Dense targets with large means, a `present` mask, several batches, float32 and float64."""
    problems, dim, out_dim, batch = 3, 5, 4, 48
    features, _, present = problem(7, batch, problems, dim, 2, 2000.0, mask=True)
    mixing = np.random.default_rng(8).normal(size=(problems, dim, out_dim))
    noise = np.random.default_rng(9).normal(size=(batch, problems, out_dim))
    targets = np.einsum("bkd,kde->bke", features, mixing) + noise + 500.0
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 2e-3)):
        acc = AffineAccumulator(problems, dim, out_dim, dtype=dtype)
        for start in range(0, batch, 8):
            part = slice(start, start + 8)
            acc.add(torch.from_numpy(features[part]).to(dtype), torch.from_numpy(targets[part]).to(dtype),
                    torch.from_numpy(present[part]))
        solved = acc.solve(0.5)
        assert solved.weight.shape == (problems, dim, out_dim) and solved.weight.dtype == dtype
        for k in range(problems):
            rows = present[:, k]
            x = features[rows, k].astype(np.float32 if dtype == torch.float32 else np.float64).astype(np.float64)
            y = targets[rows, k].astype(np.float32 if dtype == torch.float32 else np.float64).astype(np.float64)
            xc, yc = x - x.mean(0), y - y.mean(0)
            w = np.linalg.solve(xc.T @ xc + 0.5 * np.eye(dim), xc.T @ yc)
            assert int(solved.count[k]) == rows.sum()
            np.testing.assert_allclose(solved.weight[k].double().numpy(), w, rtol=tol, atol=tol)
            np.testing.assert_allclose(solved.target_mean[k].double().numpy(), y.mean(0), rtol=tol)
            scale = 1.0 + np.abs(x.mean(0)) @ np.abs(w)  # the bias carries x̄ᵀW
            np.testing.assert_allclose(solved.bias[k].double().numpy(), y.mean(0) - x.mean(0) @ w,
                                       rtol=0, atol=tol * scale.max())
    assert acc.memory_bytes == affine_memory_bytes(problems, dim, out_dim, 4)
    assert affine_memory_bytes(3, 5, 4, 8) == 3 * ((25 + 5 * 4 + 2 * 5 + 2 * 4 + 1) * 8 + 1)
    with pytest.raises(ValueError, match="targets"):
        acc.add(torch.zeros(2, problems, dim), torch.zeros(2, problems, dim))


def test_maps_equal_numpy_ridge_and_lstsq() -> None:
    model = tiny_model("cls")
    adapter = adapter_for(model)
    images, labels = draw(6, 1), torch.tensor([0, 1, 2, 3, 4, 0])
    streams, present = resid_streams(adapter, images)
    alpha = 0.7
    tuned = fit_tuned_lens(adapter, [(images, labels)], CLASSES, shots=2, alpha=alpha)
    assert tuned.weight.shape == (DEPTH, WIDTH, WIDTH) and tuned.bias.shape == (DEPTH, WIDTH)
    assert tuned.weight.dtype == torch.float64 and tuned.count.tolist() == [6 * T] * DEPTH
    for b, (w, c) in enumerate(numpy_maps(streams, present, alpha)):
        np.testing.assert_allclose(tuned.weight[b].numpy(), w, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(tuned.bias[b].numpy(), c, rtol=1e-6, atol=1e-9)
        # the map as a function: h @ W + c, both through `translate` and through the bias
        h = streams[:2, b].reshape(-1, WIDTH)
        np.testing.assert_allclose(tuned.translate(torch.from_numpy(h), b).numpy(), h @ w + c, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(h @ tuned.weight[b].numpy() + tuned.bias[b].numpy(), h @ w + c, rtol=1e-6, atol=1e-8)
    # alpha -> 0: ordinary least squares with an intercept column
    exact = fit_tuned_lens(adapter, [(images, labels)], CLASSES, shots=2, alpha=1e-10)
    for b in range(DEPTH):
        x = np.hstack([streams[:, b].reshape(-1, WIDTH), np.ones((6 * T, 1))])
        solution = np.linalg.lstsq(x, streams[:, DEPTH].reshape(-1, WIDTH), rcond=None)[0]  # [d+1, d]
        np.testing.assert_allclose(exact.weight[b].numpy(), solution[:-1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(exact.bias[b].numpy(), solution[-1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="block"):
        tuned.translate(torch.zeros(WIDTH), DEPTH + 1)


def test_several_batches_equal_one_batch() -> None:
    adapter = adapter_for(tiny_model("cls"))
    images, labels = draw(6, 2), torch.tensor([4, 0, 1, 1, 3, 2])
    whole = fit_tuned_lens(adapter, [(images, labels)], CLASSES, shots=10)
    pieces = fit_tuned_lens(adapter, stream_of(images, labels, [1, 3, 2]), CLASSES, shots=10)
    for name in ("weight", "bias", "center", "target_mean"):
        torch.testing.assert_close(getattr(pieces, name), getattr(whole, name), rtol=1e-10, atol=1e-10)
    assert torch.equal(pieces.count, whole.count) and pieces.train_images == whole.train_images == 6


@pytest.mark.parametrize("kind", ["cls", "gap"])
def test_last_block_equals_lens_and_model_output(kind: str) -> None:
    model = tiny_model(kind)
    adapter = adapter_for(model)
    tuned = fit_tuned_lens(adapter, [(draw(5, 3), torch.arange(5))], CLASSES, shots=1)
    images, labels = draw(4, 4), torch.tensor([1, 0, 4, 2])
    out = tuned.reduce(adapter, images, labels)
    L, tokens = adapter.anatomy.num_blocks, adapter.anatomy.num_tokens
    assert out.rank.shape == (4, L + 1, tokens) and out.rank.dtype == torch.int32
    assert out.correct_logit.dtype == torch.float32 and out.top1.dtype == torch.int32
    lens = Lens(model, top_k=1).run(images, labels)
    assert torch.equal(out.rank[:, L], lens.rank[:, L, STREAM_RESID])
    torch.testing.assert_close(out.correct_logit[:, L], lens.correct_logit[:, L, STREAM_RESID])
    assert torch.equal(out.top1[:, L], lens.topk_class[:, L, STREAM_RESID, :, 0])
    if kind == "cls":  # the CLS token at block L is what the head reads: the model's own rank
        with torch.no_grad():
            logits = model(images)  # [B, C]
        true = logits.gather(1, labels[:, None])
        assert torch.equal(out.rank[:, L, 0], (logits > true).sum(1).to(torch.int32))
        assert torch.equal(out.top1[:, L, 0], logits.argmax(1).to(torch.int32))
    # the tuned blocks differ from the plain lens (the maps are not the identity)
    assert not torch.equal(out.correct_logit[:, :L], lens.correct_logit[:, :L, STREAM_RESID])


def test_tuned_map_fits_the_last_stream_better_than_identity() -> None:
    adapter = adapter_for(tiny_model("cls"))
    images = draw(5, 5)
    streams, _ = resid_streams(adapter, images)
    h, y = streams[:, DEPTH - 1].reshape(-1, WIDTH), streams[:, DEPTH].reshape(-1, WIDTH)
    identity_error = ((h - y) ** 2).sum()
    for alpha in (1e-6, 1.0):
        tuned = fit_tuned_lens(adapter, [(images, torch.arange(5))], CLASSES, shots=1, alpha=alpha)
        mapped = tuned.translate(torch.from_numpy(h), DEPTH - 1).numpy()
        assert ((mapped - y) ** 2).sum() < 0.9 * identity_error


@pytest.mark.parametrize("kind", ["cls", "gap", "cait"])
def test_ranks_equal_brute_force(kind: str) -> None:
    model = tiny_model(kind)
    adapter = adapter_for(model)
    L, tokens = adapter.anatomy.num_blocks, adapter.anatomy.num_tokens
    tuned = fit_tuned_lens(adapter, [(draw(5, 6), torch.arange(5))], CLASSES, shots=1, alpha=0.5)
    images, labels = draw(4, 7), torch.tensor([3, 1, 0, 4])
    out = tuned.reduce(adapter, images, labels)
    streams, present = resid_streams(adapter, images)
    if kind == "cait":  # no CLS before the class-attention block: never a sample, never ranked
        assert L == DEPTH + 1 and present[:L, 0].sum() == 0 and present[L].all()
        assert tuned.count.tolist() == [5 * (tokens - 1)] * L
    else:
        assert tuned.count.tolist() == [5 * tokens] * L
    expected = np.full((4, L + 1, tokens), -1)
    top1 = np.full((4, L + 1, tokens), -1)
    smallest_gap = np.inf
    for b in range(L + 1):
        h = streams[:, b]  # [B, T, d]
        if b < L:
            h = h @ tuned.weight[b].numpy() + tuned.bias[b].numpy()
        with torch.no_grad():
            logits = adapter.project(torch.from_numpy(h).float()).double().numpy()  # [B, T, C]
        for i in range(4):
            for t in np.flatnonzero(present[b]):
                true = logits[i, t, labels[i]]
                expected[i, b, t] = int((logits[i, t] > true).sum())
                top1[i, b, t] = logits[i, t].argmax()
                smallest_gap = min(smallest_gap, np.abs(np.delete(logits[i, t], labels[i]) - true).min())
        np.testing.assert_allclose(out.correct_logit[:, b].double().numpy()[:, present[b]],
                                   logits[np.arange(4), :, labels.numpy()][:, present[b]], rtol=1e-4, atol=1e-4)
    assert smallest_gap > 1e-4  # the exact comparison below is not decided by rounding
    assert np.array_equal(out.rank.numpy(), expected)
    assert np.array_equal(out.top1.numpy(), top1)
    absent = out.rank == -1
    assert bool(out.correct_logit[absent].isnan().all()) and bool((out.top1[absent] == -1).all())
    assert int(absent.sum()) == 4 * int((~present).sum())
    assert 0 < (expected == 0).mean() < 1


def test_shots_selection_and_errors() -> None:
    adapter = adapter_for(tiny_model("cls"))
    labels = [0, 1, 0, 0, 2, 1, 3, 3, 4, 0, 4, 2, 1, 1]
    images = draw(len(labels), 8)
    pulled = []

    def stream(labels: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(labels), 3):
            pulled.append(start)
            yield images[start:start + 3], torch.tensor(labels[start:start + 3])

    tuned = fit_tuned_lens(adapter, stream(labels), CLASSES, shots=2)
    chosen = [0, 1, 2, 4, 5, 6, 7, 8, 10, 11]  # first two of each class, by hand
    assert pulled == [0, 3, 6, 9]  # class 2's second image is in the fourth batch; the fifth is never read
    assert tuned.train_images == 10 and tuned.images_per_class.tolist() == [2] * CLASSES
    assert tuned.count.tolist() == [len(chosen) * T] * DEPTH
    direct = fit_tuned_lens(adapter, [(images[chosen], torch.tensor(labels)[chosen])], CLASSES, shots=2)
    torch.testing.assert_close(tuned.weight, direct.weight, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="label 7"):
        fit_tuned_lens(adapter, stream([0, 1, 7]), CLASSES)
    with pytest.raises(ValueError, match="no training image"):
        fit_tuned_lens(adapter, iter([]), CLASSES)
    with pytest.raises(ValueError, match="label 5"):
        tuned.reduce(adapter, images[:2], torch.tensor([0, 5]))
    wide = TunedLens(torch.zeros(DEPTH, 8, 8), torch.zeros(DEPTH, 8), torch.zeros(DEPTH, 8), torch.zeros(DEPTH, 8),
                     torch.zeros(DEPTH, dtype=torch.int64), 0, torch.zeros(CLASSES, dtype=torch.int64), 0.0)
    with pytest.raises(ValueError, match="width"):
        wide.reduce(adapter, images[:2], torch.tensor([0, 1]))


def test_memory_formula() -> None:
    # statistics: d² + d·d + 2d + 2d + 1 values and a bool per map; solved: d² + 3d values and an int64
    assert tuned_memory_bytes(2, 3, 8) == 2 * ((9 + 9 + 12 + 1) * 8 + 1) + 2 * ((9 + 9) * 8 + 8)
    adapter = adapter_for(tiny_model("cls"))
    tuned = fit_tuned_lens(adapter, [(draw(2, 9), torch.tensor([0, 1]))], CLASSES, shots=1)
    solved = sum(t.numel() * t.element_size() for t in (tuned.weight, tuned.bias, tuned.center, tuned.target_mean,
                                                        tuned.count))
    stats = AffineAccumulator(DEPTH, WIDTH, WIDTH).memory_bytes
    assert stats + solved == tuned_memory_bytes(DEPTH, WIDTH, 8)
