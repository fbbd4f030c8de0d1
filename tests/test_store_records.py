"""LensBatch -> tokens/images rows: one row per existing (image, block, stream, token)."""

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from vitlens.data.token_labels import LABEL_CLASS, LABEL_CONTEXT, LABEL_IGNORE, LABEL_PREFIX
from vitlens.lens.output import LensBatch
from vitlens.report.results import open_results
from vitlens.store.layout import StagedParquetWriter, table_key
from vitlens.store.records import images_table, tokens_table
from vitlens.store.storage import open_storage


def hand_batch() -> tuple[LensBatch, torch.Tensor, torch.Tensor]:
    """2 images, L = 2 blocks, 1 prefix + 3 image tokens; image 1 lost its token 2."""
    class_index = torch.tensor([4, 7])
    out = LensBatch.empty(class_index, num_blocks=2, num_tokens=4, top_k=5, num_prefix_tokens=1, num_classes=10)
    out.token_present[:] = True
    out.token_present[1, 2] = False
    # rank encodes its own coordinates so every row can be checked: 1000*b + 100*slot + 10*stream + t
    b, s, st, t = torch.meshgrid(*(torch.arange(n) for n in (2, 3, 3, 4)), indexing="ij")
    out.rank = (1000 * b + 100 * s + 10 * st + t).int()
    out.correct_logit = out.rank.float() / 2
    out.topk_class = torch.arange(5).expand(2, 3, 3, 4, 5).int()
    out.topk_logit = torch.linspace(1, 2, 5).expand(2, 3, 3, 4, 5).clone()
    out.input_correct_logit = torch.full((2, 3, 3, 4), 0.25)
    out.key_value_agreement[:, :, 1] = True
    out.prediction = torch.tensor([4, 1])
    out.correct = torch.tensor([True, False])
    fg = torch.tensor([[math.nan, 0.9, 0.1, 0.6], [math.nan, 0.0, 1.0, 0.4]])
    labels = torch.tensor([[LABEL_PREFIX, LABEL_CLASS, LABEL_CONTEXT, LABEL_CLASS],
                           [LABEL_PREFIX, LABEL_IGNORE, LABEL_CLASS, LABEL_CONTEXT]], dtype=torch.int8)
    return out, fg, labels


def tokens_view_rows(table: pa.Table, root: Path, variant: str = "m") -> list[dict]:
    """`table`'s rows as the `tokens` view shows them: written by the streaming writer (the
    stored layout with its encodings), read back through `open_results`."""
    writer = StagedParquetWriter(open_storage(root), table_key("tokens", variant, "baseline", "s0"), table.schema)
    writer.write(table)
    writer.commit()
    con = open_results(root)
    return con.sql(f"SELECT * EXCLUDE (variant, experiment) FROM tokens WHERE variant = '{variant}'").to_arrow_table().to_pylist()


def test_rows_exist_only_for_real_slots_and_kept_tokens(tmp_path: Path) -> None:
    batch, fg, labels = hand_batch()
    table = tokens_view_rows(tokens_table(batch, ["a", "b"], fg, labels, has_class_token=True), tmp_path)
    # slots: resid 0..2 (3) + attn 1..2 (2) + mlp 1..2 (2) = 7; tokens 4 + 3
    assert len(table) == 7 * 4 + 7 * 3
    for row in table:
        image = "ab".index(row["image_key"])
        stream = ("resid", "attn", "mlp").index(row["stream"])
        assert row["identifiability_rank"] == 1000 * image + 100 * row["block"] + 10 * stream + row["token"]
        assert not (image == 1 and row["token"] == 2)
        assert row["stream"] == "resid" or row["block"] >= 1
        assert row["token_kind"] == ("cls" if row["token"] == 0 else "image")
        sub = row["stream"] != "resid"
        assert (row["key_value_agreement"] is None) == (not sub)
        assert row["key_value_agreement"] == (True if row["stream"] == "attn" else (False if sub else None))
        assert (row["sublayer_input_correct_logit"] == 0.25) if sub else row["sublayer_input_correct_logit"] is None
        assert row["top5_class"] == [0, 1, 2, 3, 4]
        assert np.allclose(row["top5_logit"], [1, 1.25, 1.5, 1.75, 2], atol=1e-3)
    first = table[0]
    assert first["fg_fraction"] is None and first["label"] == "prefix"
    labels_b = {(r["token"], r["label"], r["fg_fraction"]) for r in table if r["image_key"] == "b"}
    assert labels_b == {(0, "prefix", None), (1, "ignore", 0.0), (3, "context", np.float32(0.4))}


def test_gap_models_have_only_image_tokens() -> None:
    batch, fg, labels = hand_batch()
    batch.num_prefix_tokens = 0
    table = tokens_table(batch, ["a", "b"], fg, labels, has_class_token=False)
    assert set(table.column("token_kind").to_pylist()) == {"image"}


def test_images_rows_count_labels_before_removal() -> None:
    batch, _, labels = hand_batch()
    rows = images_table(batch, ["a", "b"], "s.tar", ["four", None], labels).to_pylist()
    assert [(r["image_key"], r["prediction"], r["correct"]) for r in rows] == [("a", 4, True), ("b", 1, False)]
    assert [(r["num_image_tokens"], r["num_class_tokens"], r["num_context_tokens"]) for r in rows] == [(3, 2, 1), (2, 1, 1)]
