"""Deletion curves and AUCs against hand computations; on a zoo model the global map ranks
object patches above background, and negative-test AUC > random > positive-test AUC."""

import numpy as np
import pytest
import torch

from vitlens.data.shapes import iter_shapes_samples
from vitlens.explain.deletion import curve_auc, deletion_order, kept_token_counts, reference_normalised_auc
from vitlens.explain.evaluate import method_importances, perturbation_curves
from vitlens.explain.gradients import block_head_importance, global_importance
from vitlens.models.registry import load_variant, zoo_card


def test_deletion_order_by_hand() -> None:
    importance = torch.tensor([[0.1, 0.9, 0.5, 0.5]])
    assert deletion_order(importance, "negative").tolist() == [[1, 2, 3, 0]]  # tie 2/3: lower index first
    assert deletion_order(importance, "positive").tolist() == [[0, 2, 3, 1]]


def test_auc_and_reference_normalisation_by_hand() -> None:
    accuracy = torch.tensor([0.0, 0.5, 1.0, 1.0, 0.5])  # N = 4, fractions 0, .25, .5, .75, 1
    # trapezoids: .25*(0+.5)/2 + .25*(.5+1)/2 + .25*(1+1)/2 + .25*(1+.5)/2 = .0625+.1875+.25+.1875
    assert curve_auc(accuracy) == pytest.approx(0.6875)
    # METHOD §6: sum over n = 1..N-1 only, over N * max: (.5 + 1 + 1) / (4 * 1)
    assert reference_normalised_auc(accuracy) == pytest.approx(2.5 / (4 * 1.0))
    assert reference_normalised_auc(accuracy, torch.arange(5), 4) == pytest.approx(0.625)
    assert reference_normalised_auc(torch.zeros(3)) == 0.0


def test_kept_token_counts_subsets() -> None:
    assert kept_token_counts(4).tolist() == [0, 1, 2, 3, 4]
    assert kept_token_counts(4, points=9).tolist() == [0, 1, 2, 3, 4]
    assert kept_token_counts(16, points=5).tolist() == [0, 4, 8, 12, 16]
    assert kept_token_counts(10, points=4).tolist() == [0, 3, 7, 10]  # round(10/3)=3, round(20/3)=7
    with pytest.raises(ValueError):
        kept_token_counts(4, points=1)


def test_auc_over_uneven_kept_fractions_by_hand() -> None:
    accuracy = torch.tensor([0.2, 0.6, 1.0])
    fraction = torch.tensor([0.0, 0.25, 1.0])
    # .25*(.2+.6)/2 + .75*(.6+1)/2 = .1 + .6
    assert curve_auc(accuracy, fraction) == pytest.approx(0.7)


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
    reason="finding, see vitlens/explain/README.md: on the shapes zoo the summed block/head "
           "gradients (verified equal to per-block autograd) do not single out the object and do not "
           "beat random; tests/test_explain_imagenet.py checks the same claims on ImageNet B/32",
)
METHODS_UNDER_TEST = [
    pytest.param("ours", marks=OURS_FAILS_ON_THE_ZOO),  # residual stream (the paper's text)
    pytest.param("ours_attn", marks=OURS_FAILS_ON_THE_ZOO),  # attention output (the reference code)
    "ours[ln=frozen,loss=logit]",  # beyond the paper: METHOD §6's verified fix, an option (not the default)
    "chefer",
    "rollout",
]
#: Class evidence only in the object (backgrounds never carry the class hue): "an image whose
#: class evidence sits in known patches". 16 image tokens of 16 x 16 px.
OBJECTS_MODEL = "shapes_vit_p16_objects"


@pytest.fixture(scope="module")
def objects_importances() -> tuple:
    model, images, labels, masks = zoo_batch(OBJECTS_MODEL, per_class=5, seed=321)
    importances = method_importances(model, images, labels, ln="frozen", loss="logit")
    importances["ours_attn"] = global_importance(block_head_importance(model, images, labels, "attn"))
    return model, images, labels, masks, importances


@pytest.fixture(scope="module")
def objects_auc(objects_importances: tuple) -> dict[tuple[str, str], float]:
    model, images, labels, _, importances = objects_importances
    chosen = {name: importances[name] for name in ("ours", "ours_attn", "ours[ln=frozen,loss=logit]", "chefer",
                                                   "rollout", "random")}
    return {(c.method, c.test): c.auc for c in perturbation_curves(model, images, labels, chosen)}


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_global_map_ranks_object_patches_above_background(objects_importances: tuple, method: str) -> None:
    *_, masks, importances = objects_importances
    importance = importances[method]  # [B, 16]
    patch, grid_side = 16, 4
    grid = masks.reshape(len(masks), grid_side, patch, grid_side, patch).mean(axis=(2, 4)).reshape(len(masks), -1)
    inside = torch.from_numpy(grid > 0.5)  # mostly object
    outside = torch.from_numpy(grid == 0.0)  # pure background
    wins = []
    for image in range(len(masks)):
        if inside[image].any() and outside[image].any():
            wins.append(float(importance[image][inside[image]].mean() > importance[image][outside[image]].mean()))
    assert len(wins) >= 50
    assert np.mean(wins) >= 0.8, wins


@pytest.mark.parametrize("method", METHODS_UNDER_TEST)
def test_negative_auc_beats_random_beats_positive_on_a_zoo_model(objects_auc: dict, method: str) -> None:
    auc = objects_auc
    assert auc[(method, "negative")] > auc[("random", "negative")] > auc[(method, "positive")]


def test_curves_end_with_every_token_kept(objects_importances: tuple) -> None:
    """n = N keeps every token, whatever the order: the plain model's accuracy."""
    model, images, labels, _, importances = objects_importances
    curves = perturbation_curves(model, images[:20], labels[:20], {"random": importances["random"][:20]})
    with torch.no_grad():
        plain = (model(images[:20]).argmax(1) == labels[:20]).float().mean()
    for curve in curves:
        assert curve.accuracy[-1].item() == pytest.approx(plain.item())
