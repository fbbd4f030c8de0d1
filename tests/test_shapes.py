"""Tests of the procedural shapes generator (vitlens.data.shapes)."""

from __future__ import annotations

import numpy as np
import pytest

from vitlens.data.shapes import (
    SPLIT_IDS,
    iter_shapes_samples,
    render_shapes_sample,
    shapes_class_names,
)
from vitlens.errors import UserError


def _collect(seed: int, split: str = "train", per_class: int = 3, c: float = 0.5):
    return list(iter_shapes_samples(20, per_class, 48, seed, split, context_correlation=c))


def test_class_names_unique_and_at_least_20() -> None:
    names = shapes_class_names(20)
    assert len(names) == 20 and len(set(names)) == 20
    assert len(set(shapes_class_names(24))) == 24


def test_same_seed_identical_different_seed_or_split_differs() -> None:
    first, again, other = _collect(0), _collect(0), _collect(1)
    for a, b in zip(first, again):
        assert a.key == b.key
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.object_mask, b.object_mask)
    assert sum(not np.array_equal(a.image, b.image) for a, b in zip(first, other)) == len(first)
    test_split = _collect(0, split="test")
    assert not np.array_equal(first[0].image, test_split[0].image)


def test_sample_is_reproducible_from_its_own_rng() -> None:
    sample = _collect(7)[25]  # i = 1, class 5 (interleaved order)
    assert sample.key == "shapes-train-005-00001"
    rng = np.random.default_rng([7, SPLIT_IDS["train"], 5, 1])
    image, mask = render_shapes_sample(5, 20, 48, rng, 0.5)
    np.testing.assert_array_equal(image, sample.image)
    np.testing.assert_array_equal(mask, sample.object_mask)


def test_class_balance_and_keys() -> None:
    samples = _collect(0, per_class=4)
    counts = np.bincount([s.class_index for s in samples], minlength=20)
    assert counts.tolist() == [4] * 20
    assert len({s.key for s in samples}) == len(samples)
    names = shapes_class_names(20)
    assert all(s.class_name == names[s.class_index] for s in samples)
    assert all("." not in s.key for s in samples)


def test_mask_is_exact_per_pixel() -> None:
    # Colour model: object pixels are one of two tones with a channel >= 119 (value >= 0.85
    # times 0.55); background channels are all < 90 (value <= 0.35).
    for sample in _collect(3, per_class=2):
        image, mask = sample.image.astype(int), sample.object_mask
        assert mask.dtype == bool and image.shape == (48, 48, 3)
        assert image[mask].max(axis=1).min() >= 119
        assert image[~mask].max() <= 90
        tones = np.unique(image[mask], axis=0)
        assert 1 <= len(tones) <= 2


def test_object_covers_meaningful_fraction_and_moves() -> None:
    samples = _collect(0, per_class=5)
    fractions = np.array([s.object_mask.mean() for s in samples])
    assert fractions.min() > 0.05 and 0.15 < fractions.mean() < 0.6
    centres = np.array([np.argwhere(s.object_mask).mean(axis=0) for s in samples])
    assert centres.std(axis=0).min() > 2.0  # pixels: objects are not all centred


def _background_centroid_accuracy(c: float) -> float:
    """Nearest-centroid accuracy (test split) from the mean background colour alone."""
    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        samples = list(iter_shapes_samples(20, 15, 32, 0, split, context_correlation=c))
        feats = []
        for s in samples:
            rgb = s.image[~s.object_mask].astype(float).mean(axis=0)
            feats.append(rgb / (rgb.sum() + 1e-9))  # chromaticity, brightness-free
        return np.array(feats), np.array([s.class_index for s in samples])

    train_x, train_y = features("train")
    test_x, test_y = features("test")
    centroids = np.stack([train_x[train_y == k].mean(axis=0) for k in range(20)])
    distances = ((test_x[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    return float((distances.argmin(axis=1) == test_y).mean())


def test_context_correlation_controls_background_information() -> None:
    correlated = _background_centroid_accuracy(1.0)
    uncorrelated = _background_centroid_accuracy(0.0)
    assert uncorrelated < 0.15  # chance is 0.05
    assert correlated > uncorrelated + 0.2


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_classes=40), dict(split="val"), dict(context_correlation=1.5), dict(num_classes=1)],
)
def test_bad_arguments_raise_user_error(kwargs: dict) -> None:
    args = dict(num_classes=20, per_class=1, size=32, seed=0, split="train", context_correlation=0.5)
    args.update(kwargs)
    with pytest.raises(UserError):
        next(iter_shapes_samples(**args))


def test_object_hue_is_the_class_typical_hue() -> None:
    import colorsys

    from vitlens.data.shapes import OBJECT_HUE_JITTER, typical_object_hue

    for sample in _collect(5, per_class=2):
        pixels = sample.image[sample.object_mask].astype(float)
        brightest = pixels[pixels.max(axis=1).argmax()] / 255.0  # a tone-A pixel
        hue = colorsys.rgb_to_hsv(*brightest)[0]
        expected = typical_object_hue(sample.class_index)
        distance = min(abs(hue - expected), 1 - abs(hue - expected))
        assert distance <= OBJECT_HUE_JITTER + 0.01, (sample.key, hue, expected)
