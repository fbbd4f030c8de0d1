"""Training of the embedded zoo: tiny timm `VisionTransformer`s on the shapes set, on CPU.

A frozen `TrainConfig` (one TOML file per zoo model in `jobs/zoo/`) drives both
`vitlens train` and the zoo rebuild script. Training data are generated in memory from
the shapes generator (the same samples the shards hold), deterministic per seed:
same config -> same batches -> same weights on the same machine and thread count.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

from vitlens.data.shapes import iter_shapes_samples, shapes_class_names
from vitlens.errors import UserError
from vitlens.toml_files import read_toml

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines one zoo model: architecture, data, optimisation."""

    name: str
    role: str
    # architecture (kwargs of timm's VisionTransformer)
    image_size: int = 64
    patch_size: int = 16
    embed_dim: int = 96
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 2.0
    global_pool: str = "token"  # "token" (CLS) or "avg" (GAP, no CLS token)
    # data (the shapes generator)
    num_classes: int = 20
    train_per_class: int = 400
    test_per_class: int = 50
    context_correlation: float = 0.5
    data_seed: int = 0
    # optimisation
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    label_smoothing: float = 0.1
    seed: int = 0

    def model_kwargs(self) -> dict[str, Any]:
        """The timm `VisionTransformer` kwargs of this model."""
        gap = self.global_pool == "avg"
        return {
            "img_size": self.image_size, "patch_size": self.patch_size, "num_classes": self.num_classes,
            "embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio, "global_pool": self.global_pool,
            "class_token": not gap, "fc_norm": gap if gap else None,
        }

    def data_config(self) -> dict[str, Any]:
        """The preprocessing that goes with the model (images are generated at its size)."""
        return {"input_size": [3, self.image_size, self.image_size], "interpolation": "bilinear",
                "mean": list(MEAN), "std": list(STD), "crop_pct": 1.0, "crop_mode": "center"}


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training TOML; unknown keys and wrong types name the key."""
    path = Path(path)
    raw = read_toml(path, "training config", overrides)
    known = {f.name: f for f in fields(TrainConfig)}
    for key, value in raw.items():
        if key not in known:
            raise UserError(f"{path}: unknown key '{key}'; allowed: {sorted(known)}")
        default = getattr(TrainConfig, key, None)
        if default is not None and not isinstance(value, type(default)) and not (
            isinstance(default, float) and isinstance(value, int)
        ):
            raise UserError(f"{path}: '{key}' must be a {type(default).__name__}, got {value!r}")
    for key in ("name", "role"):
        if key not in raw:
            raise UserError(f"{path}: missing required key '{key}'")
    config = TrainConfig(**raw)
    if config.global_pool not in ("token", "avg"):
        raise UserError(f"{path}: 'global_pool' must be 'token' or 'avg'")
    return config


def shapes_tensors(config: TrainConfig, split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate a split in memory as normalised images and labels.

    # -> images: [K*per_class, 3, S, S] float32, labels: [K*per_class] int64
    """
    samples = list(iter_shapes_samples(config.num_classes, per_class, config.image_size,
                                       config.data_seed, split, config.context_correlation))
    pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    labels = torch.tensor([s.class_index for s in samples], dtype=torch.int64)
    return (pixels - mean) / std, labels


def build_model(config: TrainConfig, seed: int | None = None) -> VisionTransformer:
    """A freshly initialised model of this architecture (`seed`: torch seed before init)."""
    torch.manual_seed(config.seed if seed is None else seed)
    return VisionTransformer(**config.model_kwargs())


def accuracy(model: VisionTransformer, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on a split. # images: [N, 3, S, S], labels: [N]"""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            logits = model(images[start:start + batch_size])
            correct += int((logits.argmax(-1) == labels[start:start + batch_size]).sum())
    return correct / max(1, len(labels))


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """A trained model with its held-out accuracy, training time and loss curve."""

    model: VisionTransformer
    accuracy: float
    train_seconds: float
    losses: list[float]


def train(config: TrainConfig, progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train one zoo model on CPU (AdamW, warm-up + cosine, label smoothing, random flips)."""
    images, labels = shapes_tensors(config, "train", config.train_per_class)
    test_images, test_labels = shapes_tensors(config, "test", config.test_per_class)
    started = time.perf_counter()
    model = build_model(config)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos_embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(config.steps), desc=f"train {config.name}", unit="step", disable=not progress)
    for step in bar:
        index = torch.randint(len(labels), (config.batch_size,), generator=generator)
        batch = images[index]
        flip = torch.rand(config.batch_size, generator=generator) < 0.5
        batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        loss = loss_fn(model(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    train_seconds = time.perf_counter() - started
    return TrainResult(model.eval(), accuracy(model, test_images, test_labels), train_seconds, losses)


def card_for(config: TrainConfig, result: TrainResult, command: str) -> dict[str, Any]:
    """The JSON card committed beside a zoo model's weights (`size_bytes` is set on saving)."""
    import timm

    return {
        "name": config.name,
        "role": config.role,
        "model_kwargs": config.model_kwargs(),
        "data_config": config.data_config(),
        "class_names": shapes_class_names(config.num_classes),
        "data": {"generator": "vitlens.data.shapes", "num_classes": config.num_classes,
                 "size": config.image_size, "context_correlation": config.context_correlation,
                 "seed": config.data_seed, "train_per_class": config.train_per_class,
                 "test_split": "test", "test_per_class": config.test_per_class},
        "training": {k: v for k, v in asdict(config).items()
                     if k in ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "label_smoothing", "seed")},
        "accuracy": round(result.accuracy, 4),
        "train_seconds": round(result.train_seconds, 1),
        "params": sum(p.numel() for p in result.model.parameters()),
        "command": command,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads()},
    }
