"""ImageNet-1k class names: the ONE definition, used by the shards' `meta.json` and the models.

It lives in the data layer because `vitlens.models` may import `vitlens.data`, never the
reverse. timm is imported lazily (a fast CLI start).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from timm.data import ImageNetInfo

IMAGENET1K_NUM_CLASSES: int = 1000


@lru_cache(maxsize=1)
def imagenet1k_info() -> "ImageNetInfo":
    """timm's ImageNet-1k label info (synsets in ILSVRC-2012 order = sorted wnids)."""
    from timm.data import ImageNetInfo

    return ImageNetInfo("imagenet-1k")


@lru_cache(maxsize=1)
def imagenet1k_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names by class index: the FIRST synonym of each synset.

    timm's description of class 0 is "tench, Tinca tinca"; its class name here is "tench"
    (the text before the first comma). This short form is the definition everywhere: the
    `class_name` of every ImageNet-S sample, a manifest's `class_names`, and the models'
    `class_names` (`vitlens.models.class_names.class_names_for(1000)`).
    """
    info = imagenet1k_info()
    return tuple(info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes()))
