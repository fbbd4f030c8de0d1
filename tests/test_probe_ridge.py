"""`RidgeAccumulator` against an independent numpy ridge (augmented least squares with an
unpenalised intercept, as scikit-learn's `Ridge(fit_intercept=True)`), `probe_rank` against a
hand-made score table, and the memory formula against the allocated statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitlens.probe import RidgeAccumulator, probe_rank, ridge_memory_bytes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def numpy_ridge(x: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """sklearn `Ridge(alpha)` semantics by lstsq on [Xc; √α I] vs [Yc; 0]; targets ±1.

    # x: [n, d], labels: [n] -> (W [d, C], b [C])
    """
    x = x.astype(np.float64)
    y = -np.ones((x.shape[0], num_classes))
    y[np.arange(x.shape[0]), labels] = 1.0
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    d = x.shape[1]
    a = np.vstack([x - x_mean, np.sqrt(alpha) * np.eye(d)])
    rhs = np.vstack([y - y_mean, np.zeros((d, num_classes))])
    w = np.linalg.lstsq(a, rhs, rcond=None)[0]
    return w, y_mean - x_mean @ w


def problem(seed: int, batch: int, probes: int, dim: int, classes: int, offset: float, mask: bool):
    """Random features with a large per-(probe, dim) mean, labels, and a `present` mask.

    # -> features [B, K, d] float64, labels [B] int64, present [B, K] bool
    """
    rng = np.random.default_rng(seed)
    mean = offset * rng.uniform(-1.0, 1.0, size=(1, probes, dim))
    features = mean + rng.normal(size=(batch, probes, dim)) * rng.uniform(0.5, 3.0, size=(1, probes, dim))
    labels = rng.integers(0, classes, size=batch)
    present = rng.random((batch, probes)) < (0.7 if mask else 1.1)
    if mask:
        present[:8, 0] = False  # probe 0 is absent from the first batch: its shift comes later
        present[:, 1] = True
    return features, labels, present


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("offset", [0.0, 3000.0])
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_batched_solve_equals_numpy_lstsq(device: str, dtype: torch.dtype, offset: float, alpha: float) -> None:
    probes, dim, classes, batch = 4, 6, 5, 60
    features, labels, present = problem(1, batch, probes, dim, classes, offset, mask=True)
    features = features.astype(np.float32 if dtype == torch.float32 else np.float64)
    acc = RidgeAccumulator(probes, dim, classes, device=device, dtype=dtype)
    for start in range(0, batch, 8):
        part = slice(start, start + 8)
        acc.add(torch.from_numpy(features[part]), torch.from_numpy(labels[part]), torch.from_numpy(present[part]))
    solved = acc.solve(alpha)
    assert solved.weight.shape == (probes, dim, classes) and solved.bias.shape == (probes, classes)
    assert solved.weight.dtype == dtype and solved.weight.device.type == device

    test_x, _, _ = problem(2, 7, probes, dim, classes, offset, mask=False)
    test_x = test_x.astype(features.dtype)
    scores = solved.scores(torch.from_numpy(test_x).to(device)).double().cpu().numpy()  # [7, K, C]
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for k in range(probes):
        rows = present[:, k]
        w, b = numpy_ridge(features[rows, k], labels[rows], classes, alpha)
        assert int(solved.count[k]) == rows.sum()
        np.testing.assert_allclose(solved.weight[k].double().cpu().numpy(), w, rtol=tol, atol=tol)
        # the bias carries x̄ᵀW (large with the offset): relative to that scale
        scale = 1.0 + np.abs(features[rows, k].mean(0)) @ np.abs(w)
        np.testing.assert_allclose(solved.bias[k].double().cpu().numpy(), b, rtol=0, atol=tol * scale.max())
        expected = test_x[:, k].astype(np.float64) @ w + b  # [7, C]
        np.testing.assert_allclose(scores[:, k], expected, rtol=0, atol=tol * 10)


def test_several_batches_equal_one_batch() -> None:
    probes, dim, classes, batch = 3, 5, 4, 45
    features, labels, present = problem(3, batch, probes, dim, classes, 500.0, mask=True)
    x, y, p = torch.from_numpy(features), torch.from_numpy(labels), torch.from_numpy(present)
    whole = RidgeAccumulator(probes, dim, classes)
    whole.add(x, y, p)
    pieces = RidgeAccumulator(probes, dim, classes)
    for bounds in [(0, 1), (1, 13), (13, 14), (14, 45)]:
        pieces.add(x[slice(*bounds)], y[slice(*bounds)], p[slice(*bounds)])
    one, many = whole.solve(), pieces.solve()
    for name in ("weight", "bias", "center", "target_mean"):
        torch.testing.assert_close(getattr(many, name), getattr(one, name), rtol=1e-10, atol=1e-9)
    assert torch.equal(one.count, many.count)


def test_float32_without_shift_would_fail() -> None:
    """The large-offset case is a real test of the shift: a plain float32 Gram matrix
    (Σxxᵀ − n x̄x̄ᵀ) is far from the numpy solution there."""
    features, labels, _ = problem(1, 60, 1, 6, 5, 3000.0, mask=False)
    x = torch.from_numpy(features[:, 0].astype(np.float32))
    n = x.shape[0]
    naive = x.T @ x - n * torch.outer(x.mean(0), x.mean(0))  # float32, no shift
    xc = features[:, 0].astype(np.float32).astype(np.float64)
    exact = (xc - xc.mean(0)).T @ (xc - xc.mean(0))
    assert np.abs(naive.double().numpy() - exact).max() > 1e-2 * np.abs(exact).max()


def test_absent_probe_and_single_sample() -> None:
    acc = RidgeAccumulator(2, 3, 4)
    features = torch.tensor([[[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]], dtype=torch.float64)  # [1, 2, 3]
    acc.add(features, torch.tensor([2]), torch.tensor([[True, False]]))
    solved = acc.solve()
    # one sample: Xc = 0, so W = 0 and the score is the sample's own target everywhere
    assert torch.equal(solved.weight, torch.zeros_like(solved.weight))
    assert solved.bias[0].tolist() == [-1.0, -1.0, 1.0, -1.0]
    assert solved.count.tolist() == [1, 0]
    assert torch.isfinite(solved.bias).all()


def test_labels_out_of_range_and_shapes_raise() -> None:
    acc = RidgeAccumulator(2, 3, 4)
    with pytest.raises(ValueError, match="label 4"):
        acc.add(torch.zeros(2, 2, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="label -1"):
        acc.add(torch.zeros(1, 2, 3), torch.tensor([-1]))
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.zeros(2, 3, 3), torch.tensor([0, 1]))


def test_probe_rank_hand_table_with_ties() -> None:
    scores = torch.tensor([
        [[0.5, 0.9, 0.1, 0.5], [2.0, 2.0, 2.0, 2.0], [-1.0, -3.0, -2.0, 0.0]],
        [[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 0.5, 1.0]],
    ])  # [B=2, K=3, C=4]
    labels = torch.tensor([0, 2])
    # image 0, true class 0: [0.9 > 0.5 only (tie 0.5 not counted)], [all tied], [0.0 > -1.0]
    # image 1, true class 2: [3.0 > 2.0], [3.0, 2.0 > 1.0], [1.0, 1.0, 1.0 > 0.5]
    expected = torch.tensor([[1, 0, 1], [1, 2, 3]], dtype=torch.int32)
    rank = probe_rank(scores, labels)
    assert rank.dtype == torch.int32
    assert torch.equal(rank, expected)


@pytest.mark.parametrize("dtype,size", [(torch.float64, 8), (torch.float32, 4)])
def test_memory_formula_matches_allocation(dtype: torch.dtype, size: int) -> None:
    acc = RidgeAccumulator(7, 11, 13, dtype=dtype)
    assert acc.memory_bytes == ridge_memory_bytes(7, 11, 13, size)
    assert ridge_memory_bytes(7, 11, 13, size) == 7 * ((11 * 11 + 13 * 11 + 2 * 11 + 13 + 1) * size + 1)
