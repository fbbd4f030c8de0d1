"""`explain` and `perturbation_curves` rows of a hand-made batch, cell by cell."""

from __future__ import annotations

import math

import pytest
import torch

from vitlens.data.token_labels import LABEL_CLASS, LABEL_CONTEXT, LABEL_IGNORE, LABEL_PREFIX
from vitlens.explain.evaluate import ExplainBatch, PerturbationCurve
from vitlens.store.explain_records import explain_table, perturbation_curves_table


def hand_batch() -> ExplainBatch:
    # B = 2 images, L = 2 blocks, H = 2 heads, N = 3 image tokens; value = 1000i + 100b + 10h + t
    block_head = torch.tensor([[[[1000 * i + 100 * b + 10 * h + t for t in range(3)] for h in range(2)]
                                for b in range(2)] for i in range(2)], dtype=torch.float32)
    curve = PerturbationCurve("chefer", "negative", torch.tensor([0, 2, 3]), 3,
                              predictions=torch.tensor([[5, 1], [1, 1], [1, 2]]), labels=torch.tensor([1, 2]))
    random = [PerturbationCurve("random", test, torch.tensor([0, 3]), 3, predictions=torch.tensor([[1, 0], [1, 2]]),
                                labels=torch.tensor([1, 2]), order=3) for test in ("negative", "positive")]
    return ExplainBatch(class_of_interest=torch.tensor([1, 2]), block_head=block_head,
                        baselines={"random": torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])}, curves=[curve, *random],
                        variants={"ours[ln=frozen]": torch.tensor([[-1.0, 0.5, 7.0], [2.0, -3.0, 0.25]])})


def test_explain_rows_cell_by_cell() -> None:
    labels = torch.tensor([[LABEL_PREFIX, LABEL_CLASS, LABEL_CONTEXT, LABEL_IGNORE],
                           [LABEL_PREFIX, LABEL_CONTEXT, LABEL_CONTEXT, LABEL_CLASS]], dtype=torch.int8)
    fg = torch.tensor([[math.nan, 0.9, 0.1, 0.0], [math.nan, 0.2, 0.3, 0.75]])
    rows = explain_table(hand_batch(), ["a", "b"], labels, fg, num_prefix_tokens=1).to_pylist()
    assert len(rows) == 2 * 2 * 3 + 2 * 2 * 3  # ours per block; the variant and random per token
    ours = {(r["image_key"], r["block"], r["token"]): r for r in rows if r["method"] == "ours"}
    row = ours["b", 2, 3]  # image 1, block index 1, image token 2 -> sequence position 3
    assert row["head_importance"] == [1102.0, 1112.0]
    assert row["importance"] == 2214.0
    assert row["label"] == "class" and row["fg_fraction"] == 0.75 and row["class_of_interest"] == 2
    assert ours["a", 1, 1]["head_importance"] == [0.0, 10.0]
    assert ours["a", 1, 1]["label"] == "class"
    assert ours["a", 1, 3]["label"] == "ignore"
    random = {(r["image_key"], r["token"]): r for r in rows if r["method"] == "random"}
    assert random["a", 1]["importance"] == 3.0 and random["b", 3]["importance"] == 3.0
    assert random["a", 1]["block"] is None and random["a", 1]["head_importance"] is None
    assert random["b", 2]["class_of_interest"] == 2
    variant = {(r["image_key"], r["token"]): r for r in rows if r["method"] == "ours[ln=frozen]"}
    assert len(variant) == 6 and variant["a", 3]["importance"] == 7.0 and variant["b", 2]["importance"] == -3.0
    assert variant["b", 3]["block"] is None and variant["b", 3]["head_importance"] is None
    assert variant["b", 3]["label"] == "class" and variant["a", 1]["class_of_interest"] == 1


def test_curve_rows_cell_by_cell() -> None:
    table = perturbation_curves_table(hand_batch().curves, ["a", "b"])
    rows = table.to_pylist()
    assert len(rows) == 3 * 2 + 2 * 2 * 2
    random = {(r["test"], r["image_key"], r["kept_tokens"]): r for r in rows if r["method"] == "random"}
    assert {r["order"] for r in random.values()} == {3}
    assert random["positive", "b", 0]["prediction"] == 0 and random["positive", "b", 0]["correct"] is False
    assert random["negative", "b", 3]["correct"] is True and random["negative", "a", 3]["kept_fraction"] == 1.0
    rows = [r for r in rows if r["method"] == "chefer"]
    assert {r["order"] for r in rows} == {0}
    by_key = {(r["image_key"], r["kept_tokens"]): r for r in rows}
    assert by_key["a", 0]["prediction"] == 5 and by_key["a", 0]["correct"] is False
    assert by_key["b", 0]["correct"] is False and by_key["a", 2]["correct"] is True
    assert by_key["b", 3]["correct"] is True and by_key["b", 2]["correct"] is False
    assert by_key["a", 2]["kept_fraction"] == pytest.approx(2 / 3)
    assert {r["test"] for r in rows} == {"negative"}


def test_curve_rows_need_one_key_per_image() -> None:
    with pytest.raises(ValueError, match="keys"):
        perturbation_curves_table(hand_batch().curves, ["a"])
