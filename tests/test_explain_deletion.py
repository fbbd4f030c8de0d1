"""Deletion curves and AUCs against hand computations; on a zoo model the global map ranks
object patches above background, and negative-test AUC > random > positive-test AUC."""

import numpy as np
import pytest
import torch

from vitlens.data.shapes import iter_shapes_samples
from vitlens.explain.deletion import curve_auc, keep_masks, reference_normalised_auc
from vitlens.explain.evaluate import method_importances, perturbation_curves
from vitlens.models.registry import load_variant, zoo_card


def test_keep_masks_follow_the_order() -> None:
    importance = torch.tensor([[0.1, 0.9, 0.5]])
    negative = keep_masks(importance, "negative", num_prefix_tokens=1)
    positive = keep_masks(importance, "positive", num_prefix_tokens=1)
    assert negative.shape == (4, 1, 4)
    assert negative[:, 0].tolist() == [[True, False, False, False], [True, False, True, False],
                                       [True, False, True, True], [True, True, True, True]]
    assert positive[:, 0].tolist() == [[True, False, False, False], [True, True, False, False],
                                       [True, True, False, True], [True, True, True, True]]


def test_auc_and_reference_normalisation_by_hand() -> None:
    accuracy = torch.tensor([0.0, 0.5, 1.0, 1.0, 0.5])  # N = 4, fractions 0, .25, .5, .75, 1
    # trapezoids: .25*(0+.5)/2 + .25*(.5+1)/2 + .25*(1+1)/2 + .25*(1+.5)/2 = .0625+.1875+.25+.1875
    assert curve_auc(accuracy) == pytest.approx(0.6875)
    assert reference_normalised_auc(accuracy) == pytest.approx(3.0 / (5 * 1.0))
    assert reference_normalised_auc(torch.zeros(3)) == 0.0


def zoo_batch(name: str, per_class: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, np.ndarray]:
    """Images, labels and object masks of a fresh shapes split for a zoo model."""
    loaded = load_variant(name)
    data = zoo_card(name)["data"]
    samples = list(iter_shapes_samples(data["num_classes"], per_class, data["size"], seed, "test",
                                       data["context_correlation"]))
    pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255.0
    images = (pixels - 0.5) / 0.5
    labels = torch.tensor([s.class_index for s in samples])
    return loaded.model.eval(), images, labels, np.stack([s.object_mask for s in samples])


OURS_FAILS_ON_THE_ZOO = pytest.mark.xfail(
    strict=True,
    reason="finding, see vitlens/explain/README.md: on the 64-px shapes zoo the summed block/head "
           "gradients do not single out the object (they are verified equal to per-block autograd)",
)
METHODS_UNDER_TEST = [pytest.param("ours", marks=OURS_FAILS_ON_THE_ZOO), "chefer", "rollout"]


@pytest.fixture(scope="module")
def p16_importances() -> tuple:
    model, images, labels, _ = zoo_batch("shapes_vit_p16", per_class=5, seed=321)
    return model, images, labels, method_importances(model, images, labels)


@pytest.fixture(scope="module")
def p16_auc(p16_importances: tuple) -> dict[tuple[str, str], float]:
    model, images, labels, importances = p16_importances
    chosen = {name: importances[name] for name in ("ours", "chefer", "rollout", "random")}
    return {(c.method, c.test): c.auc for c in perturbation_curves(model, images, labels, chosen)}


@pytest.fixture(scope="module")
def p8_maps() -> tuple:
    model, images, labels, masks = zoo_batch("shapes_vit_p8", per_class=2, seed=123)
    return method_importances(model, images, labels), masks


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_global_map_ranks_object_patches_above_background(p8_maps: tuple, method: str) -> None:
    importances, masks = p8_maps
    importance = importances[method]  # [B, 64]
    patch = 8
    grid = masks.reshape(len(masks), 8, patch, 8, patch).mean(axis=(2, 4)).reshape(len(masks), -1)
    inside = torch.from_numpy(grid > 0.5)  # mostly object
    outside = torch.from_numpy(grid == 0.0)  # pure background
    wins = []
    for image in range(len(masks)):
        if inside[image].any() and outside[image].any():
            wins.append(float(importance[image][inside[image]].mean() > importance[image][outside[image]].mean()))
    assert len(wins) >= 20
    assert np.mean(wins) >= 0.8, wins


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_negative_auc_beats_random_beats_positive_on_a_zoo_model(p16_auc: dict, method: str) -> None:
    auc = p16_auc
    assert auc[(method, "negative")] > auc[("random", "negative")] > auc[(method, "positive")]


def test_curves_end_with_every_token_kept(p16_importances: tuple) -> None:
    """n = N keeps every token, whatever the order: the plain model's accuracy."""
    model, images, labels, importances = p16_importances
    curves = perturbation_curves(model, images[:20], labels[:20], {"random": importances["random"][:20]})
    with torch.no_grad():
        plain = (model(images[:20]).argmax(1) == labels[:20]).float().mean()
    for curve in curves:
        assert curve.accuracy[-1].item() == pytest.approx(plain.item())
