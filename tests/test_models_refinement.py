"""The paper's Refinement variant (METHOD §8): `deit_base_trm.pth` into a plain DeiT-B, its
`transformerheads.*` modules dropped by name and every other key loaded strictly.

The fabricated checkpoints come from the registry entry itself with its timm kwargs cut to
a tiny DeiT (a real `deit_base` state dict is 350 MB).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vitlens.errors import UserError
from vitlens.models import VariantSpec, get_variant, load_variant

TINY_DEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def refinement_spec() -> VariantSpec:
    """`deit_refinement` exactly as registered, only cut to a tiny DeiT config."""
    return dataclasses.replace(get_variant("deit_refinement"), model_kwargs=TINY_DEIT)


def plain_state(seed: int = 3) -> dict[str, torch.Tensor]:
    """Weights of the plain (tiny) DeiT the Refinement checkpoint wraps, from an independent seed."""
    twin = dataclasses.replace(get_variant("deit_refinement@random"), model_kwargs=TINY_DEIT, random_seed=seed)
    return {k: v.clone() for k, v in load_variant(twin).model.state_dict().items()}


def refinement_modules() -> dict[str, torch.Tensor]:
    """Keys shaped like the refinement modules of Naseer et al. (not in timm)."""
    generator = torch.Generator().manual_seed(5)
    return {
        "transformerheads.0.0.weight": torch.randn(32, 32, generator=generator),
        "transformerheads.0.0.bias": torch.randn(32, generator=generator),
        "transformerheads.1.norm.weight": torch.randn(32, generator=generator),
        "transformerheads.1.head.weight": torch.randn(10, 32, generator=generator),
    }


def test_registry_names_exactly_the_refinement_prefix() -> None:
    spec = get_variant("deit_refinement")
    assert spec.ignored_checkpoint_keys == ("transformerheads.",)
    assert spec.timm_name == "deit_base_patch16_224.fb_in1k" and spec.weights == "checkpoint"
    assert all(s.ignored_checkpoint_keys == () for s in (get_variant("vit_b16"), get_variant("vit_cifar100")))


def test_refinement_modules_are_dropped_and_the_rest_loads_exactly(tmp_path: Path) -> None:
    plain = plain_state()
    path = tmp_path / "deit_base_trm.pth"
    torch.save({"state_dict": {**plain, **refinement_modules()}, "epoch": 299}, path)
    loaded = load_variant(refinement_spec(), checkpoint_path=path)
    assert sorted(loaded.ignored_keys) == sorted(refinement_modules())
    state = loaded.model.state_dict()
    assert sorted(state) == sorted(plain)
    for key, tensor in plain.items():
        assert torch.equal(state[key], tensor), key
    reference = dataclasses.replace(get_variant("deit_refinement@random"), model_kwargs=TINY_DEIT, random_seed=3)
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(images), load_variant(reference).model(images))


def test_ema_weights_are_not_picked_over_the_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "with_ema.pth"
    torch.save({"state_dict": plain_state(3), "state_dict_ema": plain_state(4)}, path)
    loaded = load_variant(refinement_spec(), checkpoint_path=path).model
    assert torch.equal(loaded.head.weight, plain_state(3)["head.weight"])


def test_any_other_unexpected_key_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({**plain_state(), **refinement_modules(), "refiner.scale": torch.ones(1),
                "transformerheads_extra.w": torch.ones(1)}, path)
    with pytest.raises(UserError) as caught:
        load_variant(refinement_spec(), checkpoint_path=path)
    message = str(caught.value)
    assert "other.pth does not match the model architecture: unexpected key(s) refiner.scale, " \
           "transformerheads_extra.w" in message
    assert "transformerheads.0.0.weight" not in message and "\n" not in message


def test_a_missing_or_misshapen_key_is_refused_by_name(tmp_path: Path) -> None:
    state = {**plain_state(), **refinement_modules()}
    del state["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"missing.pth does not match .*missing key\(s\) blocks.1.mlp.fc2.bias"):
        load_variant(refinement_spec(), checkpoint_path=path)
    state = {**plain_state(), "pos_embed": torch.zeros(1, 5, 32)}
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"wrong-shape key\(s\) pos_embed \[1, 5, 32\] \(model: \[1, 17, 32\]\)"):
        load_variant(refinement_spec(), checkpoint_path=path)


def test_other_variants_drop_nothing(tmp_path: Path) -> None:
    """The prefix belongs to the Refinement entry: a plain DeiT refuses the same file."""
    path = tmp_path / "deit_base_trm.pth"
    torch.save({**plain_state(), **refinement_modules()}, path)
    plain_deit = VariantSpec("plain", "deit_base_patch16_224", "test", "checkpoint", model_kwargs=TINY_DEIT)
    with pytest.raises(UserError, match=r"unexpected key\(s\) transformerheads.0.0.weight"):
        load_variant(plain_deit, checkpoint_path=path)
    with pytest.raises(UserError, match="'deit_refinement' needs a checkpoint file"):
        load_variant("deit_refinement")
