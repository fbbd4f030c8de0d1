"""Headless models (METHOD §1b): a linear-head file or num_classes, else one-line refusal.

The class embedding must be exactly the file's tensors: the projection is compared with
`F.linear(norm(h), W, b)` computed from the saved tensors, and `model(x)` with the file's
head applied to timm's own pre-logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitlens.errors import UserError
from vitlens.lens import Lens, project
from vitlens.lens.parity import check_parity
from vitlens.models import VariantSpec, get_variant, load_variant
from vitlens.models.registry import build_architecture, with_options
from vitlens.runner.spec import DataSpec, JobSpec
from vitlens.runner.variant_check import variant_problems

TINY = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2)
TINY_GAP = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
CLASSES = 7


def headless_spec(timm_name: str = "vit_small_patch14_dinov2", kwargs: dict | None = None) -> VariantSpec:
    """A cut-down headless timm architecture (DINOv2: CLS; SigLIP-GAP: average pooling)."""
    return VariantSpec("tiny_headless", timm_name, "test", "random", model_kwargs=dict(kwargs or TINY))


def make_head(rows: int = CLASSES, width: int = 32, bias: bool = True, seed: int = 11) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    head = {"weight": torch.randn(rows, width, generator=generator)}
    if bias:
        head["bias"] = torch.randn(rows, generator=generator)
    return head


def test_the_fabricated_architectures_are_headless() -> None:
    for timm_name, kwargs in (("vit_small_patch14_dinov2", TINY), ("vit_base_patch16_siglip_gap_224", TINY_GAP)):
        model = load_variant(headless_spec(timm_name, kwargs)).model
        assert model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)
        with pytest.raises(UserError, match="headless"):
            Lens(model)


@pytest.mark.parametrize("timm_name, kwargs, fmt, prefixed, bias", [
    ("vit_small_patch14_dinov2", TINY, "pth", False, True),
    ("vit_small_patch14_dinov2", TINY, "safetensors", True, True),
    ("vit_base_patch16_siglip_gap_224", TINY_GAP, "pth", True, False),
    ("vit_base_patch16_siglip_gap_224", TINY_GAP, "safetensors", False, True),
])
def test_head_file_becomes_the_class_embedding(
    tmp_path: Path, timm_name: str, kwargs: dict, fmt: str, prefixed: bool, bias: bool
) -> None:
    head = make_head(bias=bias)
    stored = {("head." + k if prefixed else k): v.clone() for k, v in head.items()}
    path = tmp_path / f"head.{fmt}"
    if fmt == "safetensors":
        save_file(stored, str(path))
    else:
        torch.save({"state_dict": stored}, path)
    loaded = load_variant(headless_spec(timm_name, kwargs), head_path=path)
    model = loaded.model
    assert model.num_classes == CLASSES and len(loaded.class_names) == CLASSES
    assert torch.equal(model.head.weight, head["weight"])
    assert (model.head.bias is None) == (not bias)

    hidden = torch.randn(3, 5, 32)
    expected = F.linear(model.norm(hidden), head["weight"], head.get("bias"))  # fc_norm is Identity in both
    assert isinstance(model.fc_norm, torch.nn.Identity)
    with torch.inference_mode():
        assert torch.allclose(project(model, hidden), expected, atol=1e-6)

    images = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.inference_mode():
        pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)  # timm's own path
        assert torch.allclose(model(images), F.linear(pre_logits, head["weight"], head.get("bias")), atol=1e-6)
    assert check_parity(model, images).ok


def test_head_file_mismatches_name_the_file_and_shapes(tmp_path: Path) -> None:
    narrow = tmp_path / "narrow.pth"
    torch.save(make_head(width=16), narrow)
    with pytest.raises(UserError, match=r"narrow.pth does not fit VisionTransformer: its weight is \[7, 16\], "
                                        r"the model's head takes \[7, 32\]"):
        load_variant(headless_spec(), head_path=narrow)
    with pytest.raises(UserError, match=r"narrow.pth does not fit"):  # the meta-device check reads shapes too
        build_architecture(with_options(headless_spec(), head_path=narrow))

    extra = tmp_path / "extra.pth"
    torch.save({**make_head(), "fc.weight": torch.zeros(2, 2)}, extra)
    with pytest.raises(UserError, match=r"extra.pth must hold 'weight' \[C, d\].*not bias, fc.weight, weight"):
        load_variant(headless_spec(), head_path=extra)
    no_weight = tmp_path / "no_weight.pth"
    torch.save({"bias": torch.zeros(3)}, no_weight)
    with pytest.raises(UserError, match="no_weight.pth must hold 'weight'"):
        load_variant(headless_spec(), head_path=no_weight)
    bad_bias = tmp_path / "bad_bias.pth"
    torch.save({"weight": torch.zeros(7, 32), "bias": torch.zeros(6)}, bad_bias)
    with pytest.raises(UserError, match=r"bad_bias.pth: 'bias' must be a \[7\] tensor.*not \[6\]"):
        load_variant(headless_spec(), head_path=bad_bias)
    flat = tmp_path / "flat.pth"
    torch.save({"weight": torch.zeros(32)}, flat)
    with pytest.raises(UserError, match=r"flat.pth: 'weight' must be a \[C, d\] tensor, not \[32\]"):
        load_variant(headless_spec(), head_path=flat)
    with pytest.raises(UserError, match="head file not found: .*missing.pth"):
        load_variant(headless_spec(), head_path=tmp_path / "missing.pth")
    with pytest.raises(UserError, match="two heads"):
        load_variant(VariantSpec("d", "deit_tiny_distilled_patch16_224", "test", "random",
                                 model_kwargs=dict(img_size=32, patch_size=16, depth=1)), head_path=narrow)
    with pytest.raises(UserError, match="zoo variant 'shapes_vit_p16' is built from its card and loads its "
                                        "own weights; it takes no head file"):
        load_variant("shapes_vit_p16", head_path=narrow)


def test_num_classes_gives_a_random_twin_its_head() -> None:
    loaded = load_variant(headless_spec(), model_kwargs={"num_classes": 5, "depth": 1})
    assert loaded.model.num_classes == 5 and len(loaded.model.blocks) == 1
    assert loaded.spec.num_classes == 5 and "num_classes" not in loaded.spec.model_kwargs
    images = torch.randn(2, 3, 28, 28)
    assert check_parity(loaded.model, images).ok


def test_a_pretrained_model_never_gets_a_random_head() -> None:
    with pytest.raises(UserError, match=r"num_classes = 1000 with the hub weights .* random classifier.*\[heads\]"):
        load_variant("vit_small_patch14_dinov2", model_kwargs={"num_classes": 1000})  # refused before any download
    with pytest.raises(UserError, match="'pretrained' is set by the weights source"):
        load_variant("vit_small_patch14_dinov2@random", model_kwargs={"pretrained": True})
    assert get_variant("vit_small_patch14_dinov2").weights == "hub"


def job(variants: tuple[str, ...], heads: tuple = (), models: dict | None = None) -> JobSpec:
    return JobSpec(name="t", output="o", variants=variants, data=DataSpec(shards=("x.tar",)),
                   heads=heads, models=models or {})


def test_headless_without_a_head_is_one_line_naming_the_variant(tmp_path: Path) -> None:
    name = "vit_small_patch14_dinov2@random"
    problems = variant_problems(job((name, "vit_b32@random")))
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith(f"variant {name!r}: ") and "headless" in problems[0]
    assert "[heads]" in problems[0] and "num_classes" in problems[0]

    assert variant_problems(job((name,), models={name: {"num_classes": 10, **TINY}})) == []
    good = tmp_path / "head.pth"
    torch.save(make_head(width=384), good)  # DINOv2-S is 384 wide
    assert variant_problems(job((name,), heads=((name, str(good)),))) == []
    narrow = tmp_path / "narrow.pth"
    torch.save(make_head(width=16), narrow)
    problems = variant_problems(job((name,), heads=((name, str(narrow)),)))
    assert len(problems) == 1 and name in problems[0] and "[7, 16]" in problems[0] and "[7, 384]" in problems[0]
    problems = variant_problems(job((name,), heads=((name, str(tmp_path / "gone.pth")),)))
    assert problems == [f"variant {name!r}: head file not found: {tmp_path / 'gone.pth'}"]
    hub = "vit_small_patch14_dinov2"
    problems = variant_problems(job((hub,), models={hub: {"num_classes": 10}}))
    assert len(problems) == 1 and "random classifier" in problems[0]


def test_cli_show_load_with_a_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitlens.cli import main

    name = "vit_small_patch14_dinov2@random"
    assert main(["models", "show", name, "--load"]) == 0
    assert "lens:        refused: VisionTransformer has no linear classifier head" in capsys.readouterr().out
    head = tmp_path / "head.pth"
    torch.save(make_head(rows=3, width=384), head)
    assert main(["models", "show", name, "--load", "--head", str(head)]) == 0
    shown = capsys.readouterr().out
    assert f"head file:   {head}" in shown and "classes:     3 (as built)" in shown and "family:      vit" in shown
