"""The embedded model zoo: tiny ViTs trained by the project on the shapes set.

Each model is two committed files in `vitlens/models/zoo/`: `<name>.safetensors` (the
weights) and `<name>.json` (its card: architecture kwargs, preprocessing, class names,
data settings, held-out accuracy, training time, the command that rebuilds it). The
variant registry discovers every card here; nothing is trained at run time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from vitlens.errors import UserError

CARD_FIELDS: tuple[str, ...] = ("name", "role", "model_kwargs", "data_config", "class_names", "accuracy")


def zoo_dir() -> Path:
    """The package folder holding the zoo's weights and cards."""
    return Path(__file__).parent / "zoo"


def list_zoo_cards() -> list[dict[str, Any]]:
    """Every committed card, sorted by name (a malformed card is a `UserError` naming it)."""
    cards = []
    for path in sorted(zoo_dir().glob("*.json")):
        try:
            card = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"zoo card {path} is not valid JSON: {err}") from None
        missing = [f for f in CARD_FIELDS if f not in card]
        if missing:
            raise UserError(f"zoo card {path} lacks {missing}")
        cards.append(card)
    return cards


def weights_path(name: str) -> Path:
    """Where the zoo model `name` keeps its weights."""
    return zoo_dir() / f"{name}.safetensors"


def build_zoo_model(card: dict[str, Any], load_weights: bool = True) -> VisionTransformer:
    """The card's `VisionTransformer`, with its committed weights unless `load_weights=False`."""
    model = VisionTransformer(**card["model_kwargs"])
    if load_weights:
        path = weights_path(card["name"])
        if not path.is_file():
            raise UserError(f"zoo weights {path} are missing (rebuild: {card.get('command', 'jobs/train_zoo.sh')})")
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as err:
            raise UserError(f"zoo weights {path} are unreadable: {err}") from None
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(f"zoo weights {path} do not match the card's architecture: "
                            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()


def save_zoo_model(model: VisionTransformer, card: dict[str, Any], out_dir: Path) -> Path:
    """Write `<name>.safetensors` and `<name>.json` into `out_dir`; returns the weights path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{card['name']}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"name": card["name"], "role": card["role"]})
    card = {**card, "size_bytes": path.stat().st_size}
    (out_dir / f"{card['name']}.json").write_text(json.dumps(card, indent=1) + "\n")
    return path
