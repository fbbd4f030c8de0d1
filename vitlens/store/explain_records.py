"""Turn an `ExplainBatch` into rows of the `explain` and `perturbation_curves` tables.

Pure reshaping (no metric is computed here). `explain`: for the paper's method one row per
(image, block, image token) with the heads as a list; for a beyond-paper variant of it
(`ours[ln=frozen,...]`) and each baseline one row per (image, image token) with `block` null
(its global map; method `random`: order 0). `perturbation_curves`: one row per (image,
method, test, kept count, order) of any list of `PerturbationCurve`s (the `explain`
experiment's, or the `probe` experiment's `linear_probe` curves).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from vitlens.data.token_labels import LABEL_NAMES
from vitlens.explain.evaluate import ExplainBatch, PerturbationCurve
from vitlens.store.schema import to_table


def _keys(keys: list[str], image_index: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(image_index.astype(np.int32)), pa.array(keys)).cast(pa.string())


def explain_table(
    result: ExplainBatch,
    keys: list[str],
    token_label: torch.Tensor,
    fg_fraction: torch.Tensor,
    num_prefix_tokens: int,
) -> pa.Table:
    """The `explain` rows of one batch: 'ours' ordered image × block × token, then the
    beyond-paper variant (if any) and each baseline ordered image × token (block null).

    # result.block_head: [B, L, H, N], variants / baselines: [B, N]; token_label, fg_fraction: [B, P+N]
    """
    block_head = result.block_head.detach().float().cpu()
    batch, depth, heads, num_image_tokens = block_head.shape
    labels = token_label.cpu().numpy()[:, num_prefix_tokens:].astype(np.int8)  # [B, N]
    fg = fg_fraction.cpu().numpy()[:, num_prefix_tokens:].astype(np.float32)  # [B, N]
    classes = result.class_of_interest.cpu().numpy()
    image_ours, block_ours, token_ours = np.meshgrid(
        np.arange(batch), np.arange(depth), np.arange(num_image_tokens), indexing="ij")
    image_ours, block_ours, token_ours = image_ours.ravel(), block_ours.ravel(), token_ours.ravel()
    per_head = block_head.permute(0, 1, 3, 2).reshape(-1, heads).numpy()  # [B*L*N, H]
    parts = [{
        "method": np.array(["ours"] * len(image_ours)),
        "image": image_ours, "block": (block_ours + 1).astype(np.int16), "token": token_ours,
        "importance": per_head.sum(axis=1),
        "head_importance": pa.FixedSizeListArray.from_arrays(pa.array(per_head.ravel()), heads).cast(
            pa.list_(pa.float32())),
    }]
    image_base, token_base = np.meshgrid(np.arange(batch), np.arange(num_image_tokens), indexing="ij")
    for method, importance in {**result.variants, **result.baselines}.items():
        parts.append({
            "method": np.array([method] * image_base.size),
            "image": image_base.ravel(), "block": None, "token": token_base.ravel(),
            "importance": importance.detach().float().cpu().numpy().ravel(),
            "head_importance": pa.nulls(image_base.size, pa.list_(pa.float32())),
        })
    image = np.concatenate([p["image"] for p in parts])
    token = np.concatenate([p["token"] for p in parts])
    block = pa.concat_arrays([
        pa.array(p["block"], type=pa.int16()) if p["block"] is not None else pa.nulls(len(p["image"]), pa.int16())
        for p in parts])
    columns = {
        "image_key": _keys(keys, image),
        "class_of_interest": classes[image],
        "method": np.concatenate([p["method"] for p in parts]),
        "block": block,
        "token": (token + num_prefix_tokens).astype(np.int16),
        "label": pa.DictionaryArray.from_arrays(pa.array(labels[image, token]), pa.array(list(LABEL_NAMES))),
        "fg_fraction": fg[image, token],
        "importance": np.concatenate([p["importance"] for p in parts]).astype(np.float32),
        "head_importance": pa.concat_arrays([p["head_importance"] for p in parts]),
    }
    return to_table("explain", columns)


def perturbation_curves_table(curves: list[PerturbationCurve], keys: list[str]) -> pa.Table:
    """The `perturbation_curves` rows of a batch's curves (all on the images `keys`, in that
    order), ordered as `curves` × kept count × image; `order` is each curve's random order.

    # curves: each predictions [K, B], kept_counts [K] -> rows
    """
    methods, tests, kept, fraction, image, prediction, correct, order = [], [], [], [], [], [], [], []
    for curve in curves:
        points, batch = curve.predictions.shape
        if batch != len(keys):
            raise ValueError(f"curve {curve.method}/{curve.test} has {batch} images, keys name {len(keys)}")
        methods += [curve.method] * (points * batch)
        tests += [curve.test] * (points * batch)
        kept.append(np.repeat(curve.kept_counts.cpu().numpy(), batch))
        fraction.append(np.repeat(curve.kept_fraction.cpu().numpy(), batch))
        image.append(np.tile(np.arange(batch), points))
        prediction.append(curve.predictions.cpu().numpy().ravel())
        correct.append(curve.correct.cpu().numpy().ravel())
        order.append(np.full(points * batch, curve.order, dtype=np.int16))
    empty = [np.zeros(0, dtype=np.int64)]
    columns = {
        "image_key": _keys(keys, np.concatenate(image or empty)),
        "method": methods,
        "test": tests,
        "kept_tokens": np.concatenate(kept or empty).astype(np.int16),
        "kept_fraction": np.concatenate(fraction or empty).astype(np.float32),
        "prediction": np.concatenate(prediction or empty).astype(np.int32),
        "correct": np.concatenate(correct or empty).astype(bool),
        "order": np.concatenate(order or empty).astype(np.int16),
    }
    return to_table("perturbation_curves", columns)
