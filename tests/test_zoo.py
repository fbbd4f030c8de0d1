"""Every committed zoo model loads offline by name and still reaches its card's accuracy
on a freshly generated test split (another seed than the card's), within 2 points."""

import pytest
import torch

from vitlens.models.registry import get_variant, load_variant
from vitlens.models.training import TrainConfig, accuracy, shapes_tensors
from vitlens.models.zoo import list_zoo_cards, weights_path

CARDS = list_zoo_cards()
ROLES = {"shapes_vit_p16": "B/32", "shapes_vit_p8": "B/16", "shapes_vit_p8_deep": "L/16", "shapes_vit_gap_p8": "GAP",
         "shapes_vit_p16_objects": "B/32"}


def test_the_zoo_has_the_four_roles_and_the_object_evidence_model() -> None:
    assert {c["name"]: c["role"] for c in CARDS} == ROLES
    context = {c["name"]: c["data"]["context_correlation"] for c in CARDS}
    assert context.pop("shapes_vit_p16_objects") == 0.0  # class evidence in the object only
    assert set(context.values()) == {0.5}


@pytest.mark.parametrize("card", CARDS, ids=[c["name"] for c in CARDS])
def test_zoo_model_matches_its_card(card: dict) -> None:
    assert weights_path(card["name"]).stat().st_size <= 5 * 1024 * 1024
    assert card["accuracy"] >= 0.90
    assert card["train_seconds"] <= 300
    loaded = load_variant(card["name"])
    assert loaded.spec.weights == "zoo"
    data = card["data"]
    config = TrainConfig(name=card["name"], role=card["role"], image_size=data["size"],
                         num_classes=data["num_classes"], context_correlation=data["context_correlation"],
                         data_seed=data["seed"] + 1000)
    images, labels = shapes_tensors(config, "test", data["test_per_class"])
    fresh = accuracy(loaded.model, images, labels)
    assert abs(fresh - card["accuracy"]) <= 0.02, (fresh, card["accuracy"])


@pytest.mark.parametrize("card", CARDS[:1], ids=[c["name"] for c in CARDS[:1]])
def test_random_twin_has_the_architecture_but_not_the_weights(card: dict) -> None:
    trained = load_variant(card["name"]).model
    twin = load_variant(card["name"] + "@random").model
    assert get_variant(card["name"] + "@random").weights == "random"
    assert [p.shape for p in trained.parameters()] == [p.shape for p in twin.parameters()]
    assert not torch.equal(trained.head.weight, twin.head.weight)
