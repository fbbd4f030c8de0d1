"""Registry names of open_clip and transformers variants (`vitlens/models/registry.py`): what
each name means, what each takes, and the preprocessing a twin gets — against open_clip's own
pretrained configs and hand-written expectations."""

from __future__ import annotations

import pytest

from vitlens.cli import main as cli_main
from vitlens.errors import UserError
from vitlens.models.library import require
from vitlens.models.registry import get_variant, load_library_model, with_options

open_clip = pytest.importorskip("open_clip")


@pytest.mark.parametrize("name, library, weights, source", [
    ("open_clip:ViT-B-32/openai", "open_clip", "hub", "ViT-B-32/openai"),
    ("open_clip:ViT-B-32", "open_clip", "checkpoint", "ViT-B-32"),
    ("open_clip:ViT-B-32/openai@random", "open_clip", "random", "ViT-B-32/openai"),
    ("open_clip:local-dir:/models/tiny", "open_clip", "hub", "local-dir:/models/tiny"),
    ("open_clip:hf-hub:timm/ViT-B-16-SigLIP", "open_clip", "hub", "hf-hub:timm/ViT-B-16-SigLIP"),
    ("hf:google/vit-base-patch16-224", "transformers", "hub", "google/vit-base-patch16-224"),
    ("hf:/data/my-folder@random", "transformers", "random", "/data/my-folder"),
])
def test_names(name: str, library: str, weights: str, source: str) -> None:
    spec = get_variant(name)
    assert (spec.library, spec.weights, spec.source, spec.timm_name) == (library, weights, source, None)


def test_what_library_variants_take() -> None:
    spec = with_options(get_variant("open_clip:ViT-B-32"), checkpoint_path="/w/b32.pt", head_path="/h.safetensors")
    assert (spec.weights, spec.checkpoint_path, spec.head_path) == ("checkpoint", "/w/b32.pt", "/h.safetensors")
    with pytest.raises(UserError, match="takes no timm kwargs"):
        with_options(get_variant("hf:org/name"), model_kwargs={"img_size": 224})
    with pytest.raises(UserError, match="names no model"):
        get_variant("open_clip:")
    with pytest.raises(UserError, match="needs a local open_clip checkpoint file"):
        load_library_model(get_variant("open_clip:ViT-B-32"))


def test_random_twin_sees_the_trained_twins_pixels() -> None:
    """The random twin of ARCH/TAG (and a checkpoint of ARCH whose tags agree) takes the tag's
    mean / std / resize mode from open_clip's own pretrained config."""
    webli = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    for name in ("open_clip:ViT-B-16-SigLIP/webli", "open_clip:ViT-B-16-SigLIP/webli@random",
                 "open_clip:ViT-B-16-SigLIP@random"):
        config = load_library_model(get_variant(name), meta=True).data_config
        assert (config["mean"], config["std"], config["crop_mode"]) == (tuple(webli["mean"]), tuple(webli["std"]),
                                                                        "squash"), name


def test_missing_extra_is_named() -> None:
    with pytest.raises(UserError, match=r"pip install 'vitlens\[clip\]'"):
        require("open_clip.no_such_module")
    with pytest.raises(UserError, match=r"pip install 'vitlens\[hf\]'"):
        require("transformers.no_such_module")


def test_models_show_names_the_library(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["models", "show", "open_clip:ViT-B-32/openai"]) == 0
    out = capsys.readouterr().out
    assert "model:       open_clip ViT-B-32/openai" in out and "open_clip's own download" in out
    assert cli_main(["heads", "zeroshot", "vit_b32", "--classes", "imagenet", "--out", "x.safetensors"]) == 2
    assert "own classifier" in capsys.readouterr().err
