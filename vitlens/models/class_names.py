"""Human-readable class names of the label spaces the registry knows (ImageNet-1k, CIFAR-100).

ImageNet-1k names come from `vitlens.data.class_names` (the one definition, shared with the
ImageNet-S shards' `meta.json`).
"""

from __future__ import annotations

from vitlens.data.class_names import imagenet1k_class_names

# CIFAR-100 fine label names in label-index order (the torchvision / original dataset order).
CIFAR100_CLASS_NAMES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)


def class_names_for(num_classes: int) -> list[str]:
    """Class names of a label space identified by its size: ImageNet-1k, CIFAR-100, else `class_<i>`."""
    if num_classes == 1000:
        return list(imagenet1k_class_names())  # defined once, in vitlens.data.class_names
    if num_classes == len(CIFAR100_CLASS_NAMES):
        return list(CIFAR100_CLASS_NAMES)
    return [f"class_{i}" for i in range(num_classes)]
