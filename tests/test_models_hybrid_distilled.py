"""No silent wrong answer on hybrid or distilled ViTs (issue 12, its first part).

Hybrid ViTs (a CNN stem before the patch projection): the token grid is
`patch_embed.grid_size` and one token covers img_size / grid_size pixels, not
`patch_size`; the data config has 3 input channels, not the stem's feature channels.
Distilled DeiTs average two heads; until that projection exists they are refused.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest
import timm
import torch

from vitlens.data.sample_format import EncodedSample, SampleMeta, encode_mask, encode_png
from vitlens.data.shard_writer import ShardWriter
from vitlens.errors import UserError
from vitlens.lens import STREAM_RESID, Lens, describe_model, project
from vitlens.lens.parity import check_parity
from vitlens.models.registry import load_variant
from vitlens.runner.spec import DataSpec, JobSpec
from vitlens.runner.variant_check import variant_problems

HYBRID = "timm:vit_tiny_r_s16_p8_224@random"  # ResNet stem of stride 4, patch 8: 7 x 7 tokens of 32 px


def test_hybrid_data_config_and_token_grid() -> None:
    loaded = load_variant(HYBRID)
    assert loaded.data_config["input_size"] == (3, 224, 224)  # not the stem's 64 feature channels
    anatomy = describe_model(loaded.model)
    assert anatomy.grid_size == (7, 7) and anatomy.token_cell == (32, 32)
    tokens = loaded.model.forward_features(torch.zeros(1, 3, 224, 224)).shape[1]
    assert tokens == 1 + 7 * 7  # the grid the model really has
    # parity: the lens's last-block CLS projection is the model's output
    images = torch.randn(2, 3, 224, 224)
    out = Lens(loaded.model).run(images, torch.tensor([3, 7]))
    expected = loaded.model(images)
    assert torch.allclose(out.correct_logit[:, out.num_blocks, STREAM_RESID, 0], expected[torch.arange(2), torch.tensor([3, 7])],
                          atol=1e-4)


@pytest.mark.parametrize("variant", ["timm:vit_base_mci_224@random"])
def test_convolutional_stem_loads_with_parity(variant: str) -> None:
    loaded = load_variant(variant)  # crashed in the data-config code: its stem has no proj.in_channels
    assert loaded.data_config["input_size"] == (3, 224, 224)
    anatomy = describe_model(loaded.model)
    images = torch.randn(1, 3, 224, 224)
    assert loaded.model.forward_features(images).shape[1] == anatomy.num_prefix_tokens + anatomy.grid_size[0] * anatomy.grid_size[1]
    out = Lens(loaded.model).run(images, torch.tensor([1]))
    assert torch.allclose(out.correct_logit[0, out.num_blocks, STREAM_RESID, 0], loaded.model(images)[0, 1], atol=1e-4)


def test_hybrid_job_token_labels_fall_on_the_right_cells(tmp_path: Path) -> None:
    from vitlens.runner.shard_job import ShardProcessor

    size = 224
    pixels = np.full((size, size, 3), 90, dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.int64)
    mask[:, 128:] = 5  # the object: the right part, columns 4..6 of the 7 x 7 grid
    pixels[:, 128:] = 200
    (tmp_path / "shards").mkdir()
    writer = ShardWriter(tmp_path / "shards", "hand", "validation", shard_size=10)
    writer.write(EncodedSample("hand-0", "image.png", encode_png(pixels), encode_mask(mask),
                               SampleMeta(4, 5, "class_4", None, None, "hand-made", "validation", "hand")))
    [entry] = writer.close()
    job = JobSpec(name="hybrid", output=str(tmp_path / "results"), variants=(HYBRID,),
                  data=DataSpec(shards=(str(tmp_path / "shards" / entry.name),)), batch_size=1)
    processor = ShardProcessor(HYBRID, job)
    processor.process(str(tmp_path / "shards" / entry.name), "hand-validation-000000")
    rows = duckdb.connect().execute(
        f"SELECT DISTINCT token, label FROM read_parquet('{tmp_path}/results/table=tokens/*/*/*.parquet') "
        "WHERE token_kind = 'image' ORDER BY token").fetchall()
    assert len(rows) == 49
    # by hand: token 1 + 7 r + c is class exactly when c >= 4 (crop_pct 0.9 moves the edge
    # to x = 129.7 of the 224 input, so cell 4 is 30/32 object, cell 3 none)
    expected = [(1 + 7 * r + c, "class" if c >= 4 else "context") for r in range(7) for c in range(7)]
    assert rows == expected


def test_distilled_deit_projects_through_the_mean_of_both_heads() -> None:
    """METHOD §1b: a token is projected through (head(norm h) + head_dist(norm h)) / 2, and the
    mean of the two heads on their own tokens is the model's output."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = model(images)
        final = model.norm(model.blocks(model._pos_embed(model.patch_embed(images))))
        by_hand = (model.head(final[:, 0]) + model.head_dist(final[:, 1])) / 2
        assert torch.allclose(by_hand, expected, atol=1e-5)  # the rule, checked on timm itself
        hidden = torch.randn(2, 5, model.embed_dim)
        averaged = (model.head(model.norm(hidden)) + model.head_dist(model.norm(hidden))) / 2
        assert torch.allclose(project(model, hidden), averaged, atol=1e-5)
    parity = check_parity(model, images)
    assert parity.ok and parity.projection_error < 1e-4
    anatomy = describe_model(model)
    assert anatomy.num_prefix_tokens == 2 and anatomy.pools_class_token
    job = JobSpec(name="d", output="/tmp/unused", variants=("timm:deit_tiny_distilled_patch16_224@random",),
                  data=DataSpec(shards=("a.tar",)))
    assert variant_problems(job) == []
