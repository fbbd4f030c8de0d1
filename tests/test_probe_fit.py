"""The probe features against timm's own modules (forward hooks), `fit_probes` against a
brute-force numpy ridge fitted one probe at a time, the shots selection against a hand count,
and `probe_importance` on a hand-made rank table."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import torch
from timm.models.cait import Cait
from timm.models.vision_transformer import VisionTransformer

from vitlens.lens import adapter_for
from vitlens.probe import fit_probes, probe_importance, probe_slots, token_features
from tests.test_lens_forward import tiny_vit as lens_tiny_vit

DEPTH, WIDTH, CLASSES, GRID = 2, 32, 5, 4
T = 1 + GRID * GRID


def tiny_vit(seed: int = 0) -> VisionTransformer:
    """test_lens_forward's tiny ViT (parameters at a scale where hidden states vary strongly
    between images), here with LayerScale so the `attn`/`mlp` streams are after `ls1`/`ls2`."""
    return lens_tiny_vit(seed, embed_dim=WIDTH, depth=DEPTH, num_classes=CLASSES, init_values=0.5)


def hooked_states(model: VisionTransformer, images: torch.Tensor) -> dict[tuple[int, str], np.ndarray]:
    """Every probe slot's hidden state from timm's own forward, by forward hooks.

    # images: [B, 3, H, W] -> {(block, stream): [B, T, d] float64}
    """
    states: dict[tuple[int, str], torch.Tensor] = {}
    handles = [model.norm_pre.register_forward_hook(lambda m, i, o: states.__setitem__((0, "resid"), o))]
    raw: dict[tuple[int, str], torch.Tensor] = {}
    for b, block in enumerate(model.blocks, start=1):
        hooks = {"resid": block, "attn": block.ls1, "mlp": block.ls2, "attn_raw": block.attn}
        for stream, module in hooks.items():
            target = raw if stream == "attn_raw" else states
            handles.append(module.register_forward_hook(
                lambda m, i, o, key=(b, stream), target=target: target.__setitem__(key, o)))
    with torch.no_grad():
        model.forward_features(images)
    for handle in handles:
        handle.remove()
    for b, block in enumerate(model.blocks, start=1):  # LayerScale: the stream is gamma * attn(...)
        torch.testing.assert_close(states[(b, "attn")], block.ls1.gamma * raw[(b, "attn_raw")])
    return {key: value.double().numpy() for key, value in states.items()}


def numpy_ridge(x: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """sklearn `Ridge(alpha, fit_intercept=True)` on ±1 targets, by lstsq on [Xc; √α I].

    # x: [n, d], labels: [n] -> (W [d, C], b [C])
    """
    y = -np.ones((x.shape[0], num_classes))
    y[np.arange(x.shape[0]), labels] = 1.0
    x_mean, y_mean = x.mean(0), y.mean(0)
    d = x.shape[1]
    a = np.vstack([x - x_mean, np.sqrt(alpha) * np.eye(d)])
    w = np.linalg.lstsq(a, np.vstack([y - y_mean, np.zeros((d, num_classes))]), rcond=None)[0]
    return w, y_mean - x_mean @ w


def stream_of(images: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append((images[start:start + size], labels[start:start + size]))
        start += size
    return out


def test_probe_slots_order() -> None:
    assert probe_slots(2) == ((0, "resid"), (1, "resid"), (1, "attn"), (1, "mlp"),
                              (2, "resid"), (2, "attn"), (2, "mlp"))
    assert probe_slots(2, ("mlp", "resid")) == ((0, "resid"), (1, "resid"), (1, "mlp"), (2, "resid"), (2, "mlp"))
    assert probe_slots(3, ("attn",)) == ((1, "attn"), (2, "attn"), (3, "attn"))
    with pytest.raises(ValueError, match="stream"):
        probe_slots(2, ("residual",))


def test_token_features_equal_timm_hooks() -> None:
    model = tiny_vit()
    adapter = adapter_for(model)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    slots = probe_slots(DEPTH)
    features, present = token_features(adapter, images, slots)
    assert features.shape == (3, len(slots), T, WIDTH) and features.dtype == torch.float32
    assert present.shape == (len(slots), T) and bool(present.all())
    states = hooked_states(model, images)
    for k, slot in enumerate(slots):
        np.testing.assert_allclose(features[:, k].double().numpy(), states[slot], rtol=1e-5, atol=1e-5)
    # a subset of slots in another order picks the same columns
    subset = ((2, "mlp"), (0, "resid"))
    part, _ = token_features(adapter, images, subset)
    torch.testing.assert_close(part[:, 0], features[:, slots.index((2, "mlp"))])
    torch.testing.assert_close(part[:, 1], features[:, 0])
    with pytest.raises(ValueError, match="block"):
        token_features(adapter, images, ((0, "attn"),))


def test_token_features_place_cait_tokens() -> None:
    """CaiT inserts the CLS in its first class-attention block: before that only positions
    1..N exist; the class-attention sub-layers cover the CLS only (hooks on timm's modules)."""
    torch.manual_seed(0)
    model = Cait(img_size=32, patch_size=8, embed_dim=WIDTH, depth=2, depth_token_only=1, num_heads=2,
                 num_classes=CLASSES, init_values=0.5).eval()
    adapter = adapter_for(model)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    slots = probe_slots(3)
    features, present = token_features(adapter, images, slots)
    states: dict[tuple[int, str], torch.Tensor] = {}
    modules = [((0, "resid"), model.pos_drop), ((1, "resid"), model.blocks[0]), ((2, "resid"), model.blocks[1]),
               ((3, "resid"), model.blocks_token_only[0]), ((3, "attn"), model.blocks_token_only[0].attn),
               ((3, "mlp"), model.blocks_token_only[0].mlp)]
    for b in (1, 2):
        modules += [((b, "attn"), model.blocks[b - 1].attn), ((b, "mlp"), model.blocks[b - 1].mlp)]
    handles = [m.register_forward_hook(lambda mod, i, o, key=key: states.__setitem__(key, o)) for key, m in modules]
    with torch.no_grad():
        model.forward_features(images)
    for handle in handles:
        handle.remove()
    all_blocks = list(model.blocks) + list(model.blocks_token_only)
    gammas = {(b, s): getattr(blk, "gamma_1" if s == "attn" else "gamma_2")
              for b, blk in enumerate(all_blocks, start=1) for s in ("attn", "mlp")}
    for k, (block, stream) in enumerate(slots):
        expected = states[(block, stream)]
        if stream != "resid":
            expected = gammas[(block, stream)] * expected
        if block <= 2:  # self-attention blocks and the embedding: image tokens only
            assert present[k].tolist() == [False] + [True] * (T - 1)
            assert bool((features[:, k, 0] == 0).all())
            torch.testing.assert_close(features[:, k, 1:], expected, rtol=1e-5, atol=1e-5)
        elif stream == "resid":  # after the class-attention block: new CLS, unchanged image tokens
            assert bool(present[k].all())
            torch.testing.assert_close(features[:, k, :1], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(features[:, k, 1:], states[(2, "resid")], rtol=1e-5, atol=1e-5)
        else:  # class-attention sub-layers: the CLS only
            assert present[k].tolist() == [True] + [False] * (T - 1)
            torch.testing.assert_close(features[:, k, :1], expected, rtol=1e-5, atol=1e-5)
    # absent positions are never trained and rank -1; present ones rank in 0..C-1
    fitted = fit_probes(adapter, [(images, torch.tensor([0, 1]))], CLASSES, shots=1)
    ranks = fitted.ranks(adapter, images, torch.tensor([1, 3]))
    assert torch.equal(fitted.present, present)
    assert bool((ranks[:, ~present] == -1).all()) and bool((ranks[:, present] >= 0).all())
    assert fitted.probes.count.reshape(len(slots), T).tolist() == (present.long() * 2).tolist()


def test_fit_probes_equal_brute_force_per_probe() -> None:
    model = tiny_vit()
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(3)
    shots = 3
    # a stream where some classes come more often than `shots` and class 4 arrives last
    labels = torch.tensor([0, 1, 0, 2, 0, 0, 3, 1, 2, 1, 1, 3, 2, 0, 3, 2, 4, 4, 1, 4, 4])
    images = torch.randn(labels.shape[0], 3, 32, 32, generator=gen)
    batches = stream_of(images, labels, [4, 5, 1, 6, 5])
    fitted = fit_probes(adapter, batches, CLASSES, shots=shots, alpha=1.0)

    # hand count: first `shots` of each class in stream order
    chosen = [i for i in range(labels.shape[0]) if int((labels[: i + 1] == labels[i]).sum()) <= shots]
    assert chosen == [0, 1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 14, 16, 17, 19]
    assert fitted.train_images == 15
    assert torch.as_tensor(fitted.images_per_class).tolist() == [3, 3, 3, 3, 3]
    assert fitted.num_tokens == T and fitted.slots == probe_slots(DEPTH)
    assert fitted.probes.weight.shape == (len(fitted.slots) * T, WIDTH, CLASSES)

    train = hooked_states(model, images[chosen])
    eval_images = torch.randn(6, 3, 32, 32, generator=gen)
    eval_labels = torch.tensor([0, 4, 2, 1, 3, 2])
    test = hooked_states(model, eval_images)
    ranks = fitted.ranks(adapter, eval_images, eval_labels)
    assert ranks.shape == (6, len(fitted.slots), T) and ranks.dtype == torch.int32

    expected = np.zeros((6, len(fitted.slots), T), dtype=np.int64)
    smallest_gap = np.inf
    for k, slot in enumerate(fitted.slots):
        for t in range(T):
            w, b = numpy_ridge(train[slot][:, t], labels[chosen].numpy(), CLASSES, 1.0)
            scores = test[slot][:, t] @ w + b  # [6, C]
            for i in range(6):
                true = scores[i, eval_labels[i]]
                expected[i, k, t] = sum(1 for c in range(CLASSES) if scores[i, c] > true)
                gaps = np.abs(np.delete(scores[i], eval_labels[i]) - true)
                if np.ptp(train[slot][:, t], axis=0).max() > 0:  # else W = 0 and every class ties
                    smallest_gap = min(smallest_gap, gaps.min())
            mine = fitted.probes.subset(k * T + t, k * T + t + 1).scores(
                torch.from_numpy(test[slot][:, t][:, None]))[:, 0]
            np.testing.assert_allclose(mine.numpy(), scores, rtol=1e-4, atol=1e-4)
    assert smallest_gap > 1e-4  # the exact comparison below is not decided by rounding
    assert np.array_equal(ranks.numpy(), expected)
    assert 0 < (expected == 0).mean() < 1  # both identifiable and unidentifiable tokens occur


def test_fit_probes_stops_when_every_class_is_full_and_checks_labels() -> None:
    model = tiny_vit()
    adapter = adapter_for(model)
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    pulled = []

    def stream(labels: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(labels), 3):
            pulled.append(start)
            yield images[start:start + 3], torch.tensor(labels[start:start + 3])

    fitted = fit_probes(adapter, stream([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0]), CLASSES, streams=("resid",), shots=1)
    assert pulled == [0, 3]  # every class had its one image after the second batch
    assert fitted.train_images == 5 and fitted.slots == ((0, "resid"), (1, "resid"), (2, "resid"))
    with pytest.raises(ValueError, match="label 7"):
        fit_probes(adapter, stream([0, 1, 7, 3]), CLASSES)
    with pytest.raises(ValueError, match="no training image"):
        fit_probes(adapter, iter([]), CLASSES)


def test_probe_importance_hand_table() -> None:
    slots = ((0, "resid"), (1, "resid"), (1, "attn"), (2, "resid"), (2, "mlp"))
    ranks = torch.tensor([[
        [9, 9, 9, 9],  # embeddings: not counted
        [5, 0, 2, -1],  # block 1 residual (token 3 absent: adds nothing)
        [0, 9, 9, 9],  # attention: not counted
        [7, 1, 0, 4],  # block 2 residual
        [0, 0, 9, 9],  # mlp: not counted
    ]], dtype=torch.int32)  # [B=1, K=5, T=4], one prefix token
    importance = probe_importance(ranks, slots, num_prefix_tokens=1)
    assert importance.dtype == torch.float32 and importance.shape == (1, 3)
    assert importance.tolist() == [[-1.0, -2.0, -4.0]]
    assert importance[0].argsort(descending=True).tolist() == [0, 1, 2]
