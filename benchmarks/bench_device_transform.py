"""The device transform (`[data] transform = "device"`) against timm's eval transform.

1. Agreement: every zoo model and `vit_b16@random` run through `vitlens.lens.Lens` on the
   model input of timm's `create_transform(**data_config, is_training=False)` (PIL decode +
   PIL resize: the exact path) and on `device_model_input`'s, with the device transform's
   resize in its CPU arithmetic (torchvision's uint8 kernel) and in CUDA's (fp32 resize,
   clamped and rounded; emulated here on the CPU). Inputs: the demo's shapes images at
   their native 64 px (PNG pixels: no resize, the two paths must be identical), shapes
   images rendered at 96 and 160 px and stored as JPEG (resized down), and ImageNet-like
   JPEGs (several sizes and orientations, grayscale, CMYK, progressive, 4:4:4). Printed per
   model and input set: same rank, same top-1 class (every token, block and stream), same
   prediction, the largest correct-logit difference, the largest |difference| of the model
   input in uint8 levels (one level = 1 / (255 std)) and the share of input values that differ.
2. Speed on ONE core (torch at 1 thread), ms per image, best of interleaved repeats, ratios
   from this one run: timm's transform (PIL decode + create_transform), the device transform
   on the CPU from JPEG bytes (torchvision decode + tensor resize/crop/normalise), and the
   same split: decode only (PIL; torchvision) and resize/crop/normalise only (timm on decoded
   PIL images; the device transform on decoded uint8 tensors), for the B/16 geometry
   (224 px, bicubic, crop 0.9) and the zoo's (64 px, bilinear, crop 1.0).

`measure(device)` times the device transform of a batch of JPEG bytes on `device` (nvJPEG
when it is CUDA) for the GPU check.

    .venv/bin/python benchmarks/bench_device_transform.py [--repeats 5] [--skip-agreement]
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from vitlens.data.device_transform import decode_images, device_model_input
from vitlens.data.geometry import EvalGeometry

ZOO = ("shapes_vit_p16", "shapes_vit_p8", "shapes_vit_p8_deep", "shapes_vit_gap_p8", "shapes_vit_p16_objects")
MODELS = ZOO + ("vit_b16@random",)
#: `vit_b16@random`'s data config (timm's vit_base_patch16_224 eval transform), for timing.
B16_CONFIG: dict[str, Any] = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
                              "std": (0.5, 0.5, 0.5), "crop_pct": 0.9, "crop_mode": "center"}
#: The zoo's data config (64 px, bilinear, crop 1.0).
ZOO_CONFIG: dict[str, Any] = {"input_size": (3, 64, 64), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                              "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "center"}
#: (height, width, PIL mode, save options) of the ImageNet-like JPEGs, cycled.
JPEG_KINDS: tuple[tuple[int, int, str, dict[str, Any]], ...] = (
    (375, 500, "RGB", {}), (500, 375, "RGB", {}), (333, 500, "L", {}), (500, 333, "RGB", {"progressive": True}),
    (480, 640, "CMYK", {}), (256, 256, "RGB", {"subsampling": 0}), (90, 120, "RGB", {}), (500, 500, "L", {}),
    (375, 500, "CMYK", {}), (427, 640, "RGB", {"progressive": True}), (300, 451, "RGB", {}), (640, 480, "RGB", {}),
)


def _jpeg(pixels: np.ndarray, mode: str = "RGB", quality: int = 90, **options: Any) -> bytes:
    """[h, w, 3] uint8 encoded as a JPEG of PIL `mode` (RGB, L or CMYK)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=quality, **options)
    return buffer.getvalue()


def imagenet_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` photo-like JPEGs: smooth colour fields, a few hard-edged shapes, fine noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        height, width, mode, options = JPEG_KINDS[i % len(JPEG_KINDS)]
        field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
            box = (x0, y0, x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2)))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 10, (height, width, 3)).astype(np.int16)
        out.append(_jpeg(np.clip(pixels, 0, 255).astype(np.uint8), mode, quality=int(rng.integers(75, 96)),
                         **options))
    return out


def shapes_inputs(per_class: int, size: int, as_jpeg: bool) -> tuple[list[torch.Tensor | bytes], list[int]]:
    """Shapes test images (20 classes, the zoo's data settings) and their classes: uint8
    [3, size, size] tensors, or JPEG bytes (quality 90)."""
    from vitlens.data.shapes import iter_shapes_samples

    images, labels = [], []
    for sample in iter_shapes_samples(num_classes=20, per_class=per_class, size=size, seed=0, split="test"):
        pixels = np.ascontiguousarray(sample.image)
        images.append(_jpeg(pixels) if as_jpeg else torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        labels.append(sample.class_index)
    return images, labels


def timm_model_input(images: Sequence[torch.Tensor | bytes], data_config: dict[str, Any]) -> torch.Tensor:
    """The exact path: PIL decode + timm's eval transform -> [B, 3, H, W] float32."""
    from timm.data import create_transform

    transform = create_transform(**data_config, is_training=False)
    out = []
    for image in images:
        if isinstance(image, torch.Tensor):
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        else:
            pil = Image.open(io.BytesIO(image)).convert("RGB")
        out.append(transform(pil))
    return torch.stack(out)


def agreement(model: torch.nn.Module, data_config: dict[str, Any], images: Sequence[torch.Tensor | bytes],
              labels: Sequence[int], device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """The lens on timm's input vs the device transform's (CPU and CUDA resize arithmetic)."""
    from vitlens.lens import Lens

    geometry = EvalGeometry.from_data_config(data_config)
    lens = Lens(model)
    class_index = torch.tensor(labels, device=device) % model.num_classes
    reference_input = timm_model_input(images, data_config).to(device)
    reference = lens.run(reference_input, class_index=class_index)
    exists = reference.rank >= 0
    level = torch.tensor(data_config["std"], device=device).view(1, 3, 1, 1) * 255
    rows = {}
    for arithmetic, in_float in (("native", None), ("fp32", True)):
        model_input = device_model_input(images, geometry, device, resize_in_float=in_float)
        out = lens.run(model_input, class_index=class_index)
        pixel_levels = ((model_input - reference_input) * level).abs()
        rows[arithmetic] = {
            "rank": float((out.rank == reference.rank)[exists].float().mean()),
            "top1": float((out.topk_class[..., 0] == reference.topk_class[..., 0])[exists].float().mean()),
            "prediction": float((out.prediction == reference.prediction).float().mean()),
            "logit": float((out.correct_logit - reference.correct_logit)[exists].abs().max()),
            "levels": float(pixel_levels.max()),
            "differ": float((pixel_levels > 0.5).float().mean()),
        }
    return rows


def agreement_table(jpegs: int, per_class: int) -> None:
    """Print the agreement table (markdown) for every model and input set."""
    from vitlens.models.registry import load_variant

    sets = {"shapes 64 px": shapes_inputs(per_class, 64, as_jpeg=False)}
    shapes96, labels96 = shapes_inputs(per_class, 96, as_jpeg=True)
    shapes160, labels160 = shapes_inputs(per_class, 160, as_jpeg=True)
    sets["shapes 96/160 px JPEG"] = (shapes96 + shapes160, labels96 + labels160)
    sets["ImageNet-like JPEG"] = (imagenet_like_jpegs(jpegs), list(range(jpegs)))
    print("| model | images | same rank | same top-1 class | same prediction | largest correct-logit difference "
          "| largest input difference (levels) | input values that differ |")
    print("|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        variant = load_variant(name)
        for set_name, (images, labels) in sets.items():
            rows = agreement(variant.model, dict(variant.data_config), images, labels)
            cpu, cuda = rows["native"], rows["fp32"]
            print(f"| `{name}` | {set_name} ({len(images)}) | {cpu['rank']:.1%} / {cuda['rank']:.1%} "
                  f"| {cpu['top1']:.1%} / {cuda['top1']:.1%} | {cpu['prediction']:.0%} / {cuda['prediction']:.0%} "
                  f"| {cpu['logit']:.3g} / {cuda['logit']:.3g} | {cpu['levels']:.0f} / {cuda['levels']:.0f} "
                  f"| {cpu['differ']:.2%} / {cuda['differ']:.2%} |", flush=True)
    print("(each cell: the device transform's CPU arithmetic / CUDA's fp32 resize arithmetic, emulated on the CPU)")


def best_of(repeats: int, runs: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Best wall time (s) of each run over `repeats` interleaved rounds, after one warm-up round."""
    best = {name: float("inf") for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def speed_table(jpegs: int, repeats: int) -> None:
    """Print ms per image on one core of the timm and device transforms, and their split."""
    from timm.data import create_transform
    from torchvision.io import ImageReadMode, decode_jpeg

    data = imagenet_like_jpegs(jpegs)
    pil_images = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
    tensors = decode_images(data, "cpu")

    def pil_decode() -> None:
        for d in data:
            Image.open(io.BytesIO(d)).convert("RGB")

    def torchvision_decode() -> None:
        for d in data:
            decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB)

    print(f"\nms per image, one core, {jpegs} ImageNet-like JPEGs, best of {repeats} interleaved rounds:")
    print("| geometry | timm (decode + transform) | device on CPU (decode + transform) | ratio "
          "| PIL decode | torchvision decode | timm transform only | device transform only | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, config in (("B/16 224 px bicubic", B16_CONFIG), ("zoo 64 px bilinear", ZOO_CONFIG)):
        geometry = EvalGeometry.from_data_config(config)
        transform = create_transform(**config, is_training=False)
        times = best_of(repeats, {
            "timm": lambda: torch.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in data]),
            "device": lambda: device_model_input(data, geometry, "cpu"),
            "pil_decode": pil_decode,
            "tv_decode": torchvision_decode,
            "timm_only": lambda: torch.stack([transform(image) for image in pil_images]),
            "device_only": lambda: device_model_input(tensors, geometry, "cpu"),
        })
        ms = {name: 1000 * seconds / jpegs for name, seconds in times.items()}
        print(f"| {label} | {ms['timm']:.2f} | {ms['device']:.2f} | {ms['device'] / ms['timm']:.2f}× "
              f"| {ms['pil_decode']:.2f} | {ms['tv_decode']:.2f} | {ms['timm_only']:.2f} | {ms['device_only']:.2f} "
              f"| {ms['device_only'] / ms['timm_only']:.2f}× |", flush=True)


def measure(device: torch.device | str, images: int = 64, repeats: int = 5) -> dict[str, Any]:
    """Images/s of the device transform of a batch of `images` ImageNet-like JPEG bytes on
    `device` (nvJPEG decode when it is CUDA), B/16 geometry, best of `repeats`; also the decode
    alone, and the largest difference (uint8 levels) of its output from the CPU path's."""
    device = torch.device(device)
    data = imagenet_like_jpegs(images)
    geometry = EvalGeometry.from_data_config(B16_CONFIG)

    def synchronised(run: Callable[[], Any]) -> Callable[[], None]:
        def timed() -> None:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return timed

    times = best_of(repeats, {
        "decode": synchronised(lambda: decode_images(data, device)),
        "transform": synchronised(lambda: device_model_input(data, geometry, device)),
    })
    on_device = device_model_input(data, geometry, device).cpu()
    on_cpu = device_model_input(data, geometry, "cpu")
    levels = float(((on_device - on_cpu) * 255 * torch.tensor(B16_CONFIG["std"]).view(1, 3, 1, 1)).abs().max())
    return {
        "device": str(device), "images": images, "geometry": "B/16 224 px bicubic crop 0.9",
        "decode_img_per_s": images / times["decode"], "transform_img_per_s": images / times["transform"],
        "max_level_difference_vs_cpu": levels,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jpegs", type=int, default=24, help="ImageNet-like JPEGs (default 24)")
    parser.add_argument("--per-class", type=int, default=1, help="shapes images per class and size (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-agreement", action="store_true", help="only the speed table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.skip_agreement:
        agreement_table(args.jpegs, args.per_class)
    speed_table(args.jpegs, args.repeats)


if __name__ == "__main__":
    main()
