"""Zero-shot class spaces (`vitlens/models/zeroshot.py`, METHOD §1c) against open_clip's own.

The class embedding is checked against open_clip's `build_zero_shot_classifier` on a tiny
CLIP with open_clip's bundled tokenizer; the shipped templates and ImageNet names against
open_clip's zero-shot metadata; the file readers and the data check against hand-made cases.
"""

from __future__ import annotations

import json

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from vitlens.errors import UserError  # noqa: E402
from vitlens.models.zeroshot import (  # noqa: E402
    IMAGENET_LABEL_SPACE,
    ClassList,
    class_embedding_from_text,
    class_space_mismatch,
    head_file_classes,
    imagenet_class_names,
    openai_imagenet_templates,
    read_class_names,
    read_templates,
    write_zeroshot_head,
    zeroshot_head_tensors,
)
from vitlens.models.weights import read_head_file  # noqa: E402


@pytest.fixture(scope="module")
def tiny_clip() -> "open_clip.CLIP":
    """A one-layer CLIP whose text tower takes open_clip's bundled tokenizer."""
    torch.manual_seed(0)
    vision = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, image_size=32, patch_size=16)
    text = open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    return open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def test_shipped_lists_are_open_clips() -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    assert openai_imagenet_templates() == [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    assert imagenet_class_names() == list(IMAGENET_CLASSNAMES)


def test_class_embedding_equals_open_clips_zero_shot_classifier(tiny_clip) -> None:
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    names = ["tench", "goldfish", "great white shark", "church"]
    templates = openai_imagenet_templates()[:7]
    expected = build_zero_shot_classifier(tiny_clip, tokenizer, names, templates, num_classes_per_batch=3,
                                          device="cpu", use_tqdm=False)  # [d', C]
    embedding = class_embedding_from_text(lambda prompts: tiny_clip.encode_text(tokenizer(prompts)), names, templates)
    torch.testing.assert_close(embedding, expected.T, rtol=0, atol=1e-6)
    # the head reproduces open_clip's zero-shot logits on image features
    scale = float(tiny_clip.logit_scale.detach().exp())
    weight, bias = zeroshot_head_tensors(embedding, scale, None)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = tiny_clip.encode_image(images, normalize=True)
        torch.testing.assert_close(features @ weight.T, scale * features @ expected, rtol=0, atol=1e-5)
    assert bias is None
    _, bias = zeroshot_head_tensors(embedding, scale, -10.0)
    assert bias.tolist() == [-10.0] * len(names)


def test_head_file_round_trip(tmp_path) -> None:
    weight, bias = torch.randn(3, 8), torch.full((3,), -2.5)
    classes = ClassList(("cat", "dog", "fox"), "names:animals.txt")
    path = write_zeroshot_head(tmp_path / "head.safetensors", weight, bias, classes, ["a {}."], "open_clip:X", 10.0, -2.5)
    read_weight, read_bias = read_head_file(path)  # an ordinary head file
    assert torch.equal(read_weight, weight) and torch.equal(read_bias, bias)
    assert head_file_classes(path) == classes
    with pytest.raises(UserError, match="safetensors"):
        write_zeroshot_head(tmp_path / "head.pt", weight, bias, classes, ["a {}."], "m", 1.0, None)


def test_readers_refuse_in_one_line(tmp_path) -> None:
    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of a {}.\n\nno placeholder here\n")
    with pytest.raises(UserError, match=r"templates.txt:3: .*exactly one"):
        read_templates(bad)
    good = tmp_path / "good.txt"
    good.write_text("a photo of a {}.\n\nitap of a {}.\n")
    assert read_templates(good) == ["a photo of a {}.", "itap of a {}."]
    assert len(read_templates(None)) == 80
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\ncat\n")
    with pytest.raises(UserError, match=r"names.txt: class name 'cat' appears twice"):
        read_class_names(names)
    with pytest.raises(UserError, match="not found"):
        read_class_names(tmp_path / "missing.txt")
    names.write_text("cat\n\ndog\n")
    assert read_class_names(names) == ClassList(("cat", "dog"), "names:names.txt")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"dataset": "shapes", "class_names": ["circle", "square"]}))
    assert read_class_names(manifest) == ClassList(("circle", "square"), "dataset:shapes")
    manifest.write_text(json.dumps({"dataset": "imagenet_s50", "class_names": ["goldfish"] * 2}))
    assert read_class_names(manifest).label_space == IMAGENET_LABEL_SPACE
    assert read_class_names("imagenet").names[:2] == ("tench", "goldfish")


def test_class_space_against_data() -> None:
    shapes = {"dataset": "shapes", "class_names": ["circle", "square", "star"]}
    imagenet_s = {"dataset": "imagenet_s919", "class_names": ["x"] * 919}
    own = ClassList(("circle", "square", "star"), "dataset:shapes")
    assert class_space_mismatch(own, shapes) is None
    swapped = ClassList(("circle", "star", "square"), "names:n.txt")
    assert "first difference at index 1" in class_space_mismatch(swapped, shapes)
    assert "3 classes" in class_space_mismatch(ClassList(("circle", "square"), "names:n.txt"), shapes)
    imagenet = read_class_names("imagenet")
    assert class_space_mismatch(imagenet, imagenet_s) is None
    assert "--classes imagenet" in class_space_mismatch(own, imagenet_s)
    assert class_space_mismatch(imagenet, shapes) is not None
