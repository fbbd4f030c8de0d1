"""Config-only `save_pretrained` folders, one per transformers class the coverage sweep checks.

Each folder holds the class's default configuration (the library's base-size model: the
architecture a hub checkpoint of that class has) with 1000 labels, its `architectures` entry,
and the image processor such checkpoints ship; no weights and no tokenizer. The sweep checks
`hf:FOLDER@random` (the random twin is built from the config alone); a contrastive model's
check builds its class space from random unit rows when no tokenizer is there (the row says so).

    .venv/bin/python benchmarks/coverage_sweep.py --library transformers --out hf.csv
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: folder name -> (config class, architecture, config kwargs, image processor class, processor kwargs)
CLASSES: dict[str, tuple[str, str, dict[str, Any], str, dict[str, Any]]] = {
    "vit-base-patch16-224": ("ViTConfig", "ViTForImageClassification", {}, "ViTImageProcessor", {}),
    "deit-base-patch16-224": ("DeiTConfig", "DeiTForImageClassification", {}, "DeiTImageProcessor", {}),
    "deit-base-distilled-patch16-224": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {},
                                        "DeiTImageProcessor", {}),
    "beit-base-patch16-224": ("BeitConfig", "BeitForImageClassification",
                              {"use_relative_position_bias": True, "use_mean_pooling": True,
                               "layer_scale_init_value": 0.1}, "BeitImageProcessor", {}),
    "data2vec-vision-base-ft1k": ("Data2VecVisionConfig", "Data2VecVisionForImageClassification",
                                  {"use_relative_position_bias": True, "use_mean_pooling": True},
                                  "BeitImageProcessor", {}),
    "dinov2-small-imagenet1k-1-layer": ("Dinov2Config", "Dinov2ForImageClassification",
                                        {"hidden_size": 384, "num_attention_heads": 6, "image_size": 518},
                                        "BitImageProcessor", {"size": {"shortest_edge": 256},
                                                              "crop_size": {"height": 224, "width": 224}}),
    "dinov2-with-registers-small-imagenet1k-1-layer": (
        "Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification",
        {"hidden_size": 384, "num_attention_heads": 6, "image_size": 518, "num_register_tokens": 4},
        "BitImageProcessor", {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}),
    "clip-vit-base-patch32": ("CLIPConfig", "CLIPModel", {}, "CLIPImageProcessor", {}),
    "clip-vit-base-patch16": ("CLIPConfig", "CLIPModel", {"vision_config": {"patch_size": 16}},
                              "CLIPImageProcessor", {}),
    "siglip-base-patch16-224": ("SiglipConfig", "SiglipModel", {}, "SiglipImageProcessor", {}),
    "swin-tiny-patch4-window7-224": ("SwinConfig", "SwinForImageClassification", {}, "ViTImageProcessor", {}),
}


def write_config_folders(root: Path) -> list[Path]:
    """Write (or keep) one config-only folder per entry of `CLASSES` under `root`, in order."""
    import transformers

    folders = []
    for name, (config_name, architecture, kwargs, processor_name, processor_kwargs) in CLASSES.items():
        folder = root / name
        if not (folder / "config.json").is_file():
            config = getattr(transformers, config_name)(**kwargs)
            config.architectures = [architecture]
            if not architecture.endswith(("CLIPModel", "SiglipModel")):
                config.id2label = {i: f"class_{i}" for i in range(1000)}
                config.label2id = {label: i for i, label in config.id2label.items()}
            config.save_pretrained(folder)
            getattr(transformers, processor_name)(**processor_kwargs).save_pretrained(folder)
        folders.append(folder)
    return folders
