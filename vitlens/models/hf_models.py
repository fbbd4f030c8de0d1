"""`hf:` variants: which transformers loader builds a hub id or a local `save_pretrained` folder.

The model's `config.json` (`model_type`) decides: contrastive models (CLIP, SigLIP) go to
`hf_zeroshot.py` (their class space comes from text), image classifiers to
`hf_classifiers.py`. Both use transformers' own `from_pretrained`, so a hub id downloads
through the library's cache exactly as a local folder is read.
"""

from __future__ import annotations

from vitlens.errors import UserError
from vitlens.models.library import LibraryModel, require


def model_type_of(source: str) -> str:
    """`config.model_type` of a hub id or local folder (transformers' own `AutoConfig`)."""
    transformers = require("transformers")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read the transformers config of {source!r} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); give a hub id (downloaded by "
                        "transformers) or a folder written by save_pretrained") from err
    return str(config.model_type)


def load_hf_model(source: str, *, random_seed: int | None = None, device: str = "cpu",
                  meta: bool = False) -> LibraryModel:
    """The transformers model at `source` through the loader of its model type."""
    from vitlens.models import hf_classifiers, hf_zeroshot

    model_type = model_type_of(source)
    if model_type in hf_zeroshot.MODEL_TYPES:
        return hf_zeroshot.load_hf_zeroshot(source, random_seed=random_seed, device=device, meta=meta)
    if model_type in hf_classifiers.MODEL_TYPES:
        return hf_classifiers.load_hf_classifier(source, random_seed=random_seed, device=device, meta=meta)
    if model_type in hf_classifiers.REFUSED:  # a known refusal (Swin: hierarchical) says why
        raise UserError(f"transformers model {source!r} ({model_type!r}) is not supported: "
                        f"{hf_classifiers.REFUSED[model_type]}")
    known = ", ".join(sorted((*hf_classifiers.MODEL_TYPES, *hf_zeroshot.MODEL_TYPES)))
    raise UserError(f"transformers model {source!r} is a {model_type!r}; vitlens analyses these model types: {known}")
