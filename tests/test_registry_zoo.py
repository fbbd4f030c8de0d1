"""Zoo variants through the registry: discovery, weights, random twins, preprocessing, the lens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vitlens.errors import UserError
from vitlens.lens import STREAM_RESID, Lens, describe_model, embed, iter_block_traces
from vitlens.models import get_variant, list_variants, load_variant
from vitlens.models import zoo
from tests.test_lens_forward import TINY, tiny_vit

CARD = {
    "name": "test_zoo_vit",
    "role": "B/32",
    "model_kwargs": TINY,
    "data_config": {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
                    "std": [0.25, 0.25, 0.25], "crop_pct": 1.0, "crop_mode": "center"},
    "class_names": [f"shape_{i}" for i in range(10)],
    "accuracy": 1.0,
}


@pytest.fixture
def fake_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> VisionTransformer:
    """A zoo folder holding one tiny trained-looking model (saved with the zoo's own writer)."""
    monkeypatch.setattr(zoo, "zoo_dir", lambda: tmp_path)
    model = tiny_vit(seed=3)
    zoo.save_zoo_model(model, CARD, tmp_path)
    return model


def test_zoo_card_becomes_a_variant_with_its_weights(fake_zoo: VisionTransformer) -> None:
    names = [spec.name for spec in list_variants()]
    assert names[-1] == "test_zoo_vit"
    spec = get_variant("test_zoo_vit")
    assert (spec.weights, spec.role, spec.timm_name, spec.num_classes) == ("zoo", "B/32", None, 10)
    loaded = load_variant("test_zoo_vit")
    for name, tensor in fake_zoo.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.class_names == CARD["class_names"]
    config = loaded.data_config
    assert config["input_size"] == (3, 32, 32) and config["std"] == (0.25, 0.25, 0.25)
    assert config["interpolation"] == "bilinear" and config["crop_pct"] == 1.0


def test_zoo_random_twin_is_seeded_and_not_the_trained_weights(fake_zoo: VisionTransformer) -> None:
    first = load_variant("test_zoo_vit@random").model
    second = load_variant("test_zoo_vit@random").model
    assert torch.equal(first.head.weight, second.head.weight)
    assert not torch.equal(first.head.weight, fake_zoo.head.weight)


def test_zoo_errors(fake_zoo: VisionTransformer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="loads its own weights"):
        load_variant("test_zoo_vit", checkpoint_path=tmp_path / "x.pth")
    (tmp_path / "test_zoo_vit.safetensors").unlink()
    with pytest.raises(UserError, match="test_zoo_vit.safetensors"):
        load_variant("test_zoo_vit")


def committed_cards() -> list[str]:
    """Names of the zoo models committed with the package."""
    return [card["name"] for card in zoo.list_zoo_cards()]


@pytest.mark.parametrize("name", committed_cards())
def test_committed_zoo_models_run_exactly_through_the_lens(name: str) -> None:
    loaded = load_variant(name)
    model = loaded.model
    size = loaded.data_config["input_size"]
    images = torch.randn(2, *size)
    expected = model(images)
    labels = torch.tensor([0, 1])
    out = Lens(model).run(images, labels)
    assert torch.equal(out.prediction, expected.argmax(dim=-1))
    if model.has_class_token:
        assert torch.allclose(out.correct_logit[:, -1, STREAM_RESID, 0], expected[:, :2].diagonal(), atol=1e-5)
    else:  # GAP: the pooled last residual stream through fc_norm and head is the output
        anatomy = describe_model(model)
        with torch.inference_mode():
            final = list(iter_block_traces(model, embed(model, images, anatomy), anatomy))[-1].resid_post
            pooled = model.head(model.fc_norm(final.mean(dim=1)))
        assert torch.allclose(pooled, expected, atol=1e-5)
