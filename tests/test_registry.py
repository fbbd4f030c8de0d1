"""The variant registry: names, random twins, checkpoint loading and its errors, data config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlens.cli import main
from vitlens.errors import UserError
from vitlens.lens import STREAM_RESID, Lens, describe_model, embed, iter_block_traces
from vitlens.models import VariantSpec, get_variant, list_variants, load_variant
from vitlens.models import weights as weights_module

# a ViT-Ti/16 cut down to 32 px and 2 blocks: timm architecture, instant to build
SMALL = dict(img_size=32, depth=2)
PAPER_NAMES = ("vit_b32", "vit_b16", "vit_l16", "vit_miil", "vit_gap", "vit_cifar100", "deit_refinement")


def small_spec(weights: str, checkpoint_path: str | None = None) -> VariantSpec:
    """A registry spec for the cut-down timm ViT-Ti."""
    return VariantSpec("small", "vit_tiny_patch16_224", "test", weights,  # type: ignore[arg-type]
                       checkpoint_path=checkpoint_path, num_classes=7, model_kwargs=SMALL)


def test_paper_variants_are_registered_by_timm_name() -> None:
    names = [spec.name for spec in list_variants()]
    assert names[:7] == list(PAPER_NAMES)
    assert get_variant("vit_b32").timm_name == "vit_base_patch32_224.augreg_in21k_ft_in1k"
    assert get_variant("vit_gap").timm_name == "vit_base_patch16_rpn_224.sw_in1k"
    assert get_variant("vit_cifar100").num_classes == 100
    assert get_variant("deit_refinement").weights == "checkpoint"


def test_unknown_name_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no_such_vit"):
        get_variant("no_such_vit")
    with pytest.raises(UserError, match="unknown model variant"):
        get_variant("no_such_vit@random")


def test_any_timm_name_and_random_twin() -> None:
    spec = get_variant("timm:vit_small_patch16_224")
    assert (spec.timm_name, spec.weights) == ("vit_small_patch16_224", "hub")
    twin = get_variant("vit_b16@random")
    assert (twin.name, twin.weights, twin.random_seed) == ("vit_b16@random", "random", 0)
    assert twin.timm_name == get_variant("vit_b16").timm_name


def test_random_twin_is_deterministic_and_not_a_hub_download() -> None:
    first = load_variant(small_spec("random")).model
    torch.manual_seed(123)  # the registry must reseed itself
    second = load_variant(small_spec("random")).model
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert not first.training


def test_checkpoint_loads_exact_weights(tmp_path: Path) -> None:
    source = load_variant(dataclasses.replace(small_spec("random"), random_seed=5)).model
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = load_variant(small_spec("checkpoint", str(path))).model
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    via_argument = load_variant(small_spec("random"), checkpoint_path=path).model
    assert torch.equal(via_argument.head.weight, source.head.weight)


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint file not found: .*missing.pth"):
        load_variant(small_spec("checkpoint", str(tmp_path / "missing.pth")))
    with pytest.raises(UserError, match="needs a checkpoint file"):
        load_variant(small_spec("checkpoint"))
    wrong = tmp_path / "wrong.pth"
    state = load_variant(small_spec("random")).model.state_dict()
    state["refinement.extra"] = torch.zeros(3)
    torch.save(state, wrong)
    with pytest.raises(UserError, match="wrong.pth does not match.*refinement.extra"):
        load_variant(small_spec("checkpoint", str(wrong)))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint .*corrupt.pth"):
        load_variant(small_spec("checkpoint", str(corrupt)))
    foreign = tmp_path / "foreign.npz"  # original-JAX format goes through timm's custom loader
    np.savez(foreign, unrelated=np.zeros(3))
    with pytest.raises(UserError, match="cannot read checkpoint .*foreign.npz"):
        load_variant(small_spec("checkpoint", str(foreign)))


def test_paper_checkpoint_variant_without_file_is_an_error_but_twin_builds() -> None:
    with pytest.raises(UserError, match="vit_cifar100.*needs a checkpoint"):
        load_variant("vit_cifar100")
    twin = load_variant(dataclasses.replace(get_variant("vit_cifar100@random"), model_kwargs=SMALL))
    assert twin.model.num_classes == 100
    assert twin.class_names[:3] == ["apple", "aquarium_fish", "baby"]


@pytest.mark.parametrize("name", ["vit_gap", "vit_miil", "deit_refinement", "vit_b32"])
def test_paper_architectures_run_exactly_through_the_lens(name: str) -> None:
    """The paper's real timm architectures (cut to 2 blocks, 32 px): lens logits == model(x)."""
    spec = dataclasses.replace(get_variant(name + "@random"), model_kwargs=SMALL)
    model = load_variant(spec).model
    images = torch.randn(2, 3, 32, 32)
    expected = model(images)
    labels = expected.argmin(dim=-1)
    out = Lens(model).run(images, labels)
    assert torch.equal(out.prediction, expected.argmax(dim=-1))
    if model.global_pool == "avg":
        anatomy = describe_model(model)
        assert anatomy.post_norm and anatomy.num_prefix_tokens == 0
        with torch.inference_mode():
            final = list(iter_block_traces(model, embed(model, images, anatomy), anatomy))[-1].resid_post
            pooled = model.head(model.fc_norm(final.mean(dim=1)))
        assert torch.allclose(pooled, expected, atol=1e-5)
    else:
        correct = out.correct_logit[:, -1, STREAM_RESID, 0]
        assert torch.allclose(correct, expected[torch.arange(2), labels], atol=1e-5)
        assert bool((out.rank[:, -1, STREAM_RESID, 0] == expected.shape[1] - 1).all())


def test_hub_failure_is_a_user_error_not_a_random_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no internet")

    monkeypatch.setattr(weights_module.timm, "create_model", offline)
    with pytest.raises(UserError, match="cannot load the hub weights of timm model 'vit_base_patch32"):
        load_variant("vit_b32")


def test_data_config_from_the_model_with_overrides() -> None:
    loaded = load_variant(dataclasses.replace(small_spec("random"), data_config_overrides={"crop_pct": 1.0}))
    config = loaded.data_config
    assert config["input_size"] == (3, 32, 32)
    assert config["crop_pct"] == 1.0
    assert config["interpolation"] == "bicubic" and config["mean"] == (0.5, 0.5, 0.5)
    assert loaded.class_names == [f"class_{i}" for i in range(7)]


def test_models_without_a_lens_adapter_are_refused_by_the_lens() -> None:
    """The registry builds any timm model; whether the lens analyses it is its adapter's call."""
    spec = VariantSpec("r", "resnet18", "test", "random", num_classes=3)
    model = load_variant(spec).model
    with pytest.raises(UserError, match="the lens has no adapter for ResNet"):
        describe_model(model)
    with pytest.raises(UserError, match="the lens has no adapter for ResNet"):
        Lens(model)


def test_cli_models_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    for name in PAPER_NAMES:
        assert name in listing
    assert "vit_base_patch16_rpn_224.sw_in1k" in listing
    assert main(["models", "show", "vit_gap@random"]) == 0
    shown = capsys.readouterr().out
    assert "GAP" in shown and "random" in shown
    assert main(["models", "show", "nope"]) == 2
    assert "unknown model variant 'nope'" in capsys.readouterr().err


def test_cli_show_load_prints_preprocessing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "show", "timm:vit_tiny_patch16_224@random", "--load"]) == 0
    shown = capsys.readouterr().out
    assert "data.input_size: (3, 224, 224)" in shown and "prefix tokens: 1" in shown
