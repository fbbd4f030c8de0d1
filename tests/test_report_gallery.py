"""The gallery (`vitlens.report.gallery`, `vitlens show`) on a hand-made result set and shard.

Variant `toy`: 1 prefix token, a 2 × 3 grid of 16-pixel cells over a 32 × 48 input (the eval
transform leaves a 32 × 48 image as it is), 2 blocks, 4 classes. Every image's object fills
cell (0, 1) of its mask; image `a0` has rank 0 at cells (0, 1) and (1, 2) in the last block.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import matplotlib
from matplotlib.colors import Normalize
from PIL import Image

from vitlens.cli import main as cli_main
from vitlens.data.sample_format import EncodedSample, SampleMeta, encode_mask, encode_png
from vitlens.data.shard_writer import ShardWriter
from vitlens.report.gallery import (
    SCORE_CMAP,
    GallerySelection,
    ImageInfo,
    VariantInfo,
    block_panels,
    draw_cells,
    gallery_html,
    gallery_markdown,
    identifiability_scores,
    label_outline_segments,
    select_keys,
    token_grid,
    top1_colour_grid,
    write_gallery,
)
from vitlens.report.image_source import load_sample
from vitlens.store.layout import table_file, write_parquet_atomic
from vitlens.store.schema import to_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROWS, COLS, PREFIX, BLOCKS, CLASSES, HEIGHT, WIDTH = 2, 3, 1, 2, 4, 32, 48
TOKENS = PREFIX + ROWS * COLS
CLASS_NAMES = ["circle", "square", "triangle", "star"]
DATA_CONFIG = {"input_size": [3, HEIGHT, WIDTH], "interpolation": "bilinear", "mean": [0.5] * 3,
               "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center"}
# key -> (class_index, prediction)
IMAGES = {"a0": (0, 0), "a1": (0, 0), "a2": (0, 1), "b0": (1, 1), "b1": (1, 2), "c0": (2, 3)}
RANK0_TOKENS = (PREFIX + 1, PREFIX + 5)  # cells (0, 1) and (1, 2) of image a0, last block
VARIANT = VariantInfo("toy", "vit", BLOCKS, PREFIX, ROWS, COLS, HEIGHT, WIDTH, CLASSES, DATA_CONFIG, tuple(CLASS_NAMES))


def _pixels(seed: int) -> np.ndarray:
    """A 32 × 48 RGB image: a red object in cell (0, 1), a blue ground."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[..., 2] = 200
    pixels[:16, 16:32] = (230, 20, 20 + seed)
    return pixels


def _object_mask() -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[:16, 16:32] = True
    return mask


def _write_shard(folder: Path) -> Path:
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, "toy", "validation", shard_size=100)
    for i, (key, (cls, _)) in enumerate(IMAGES.items()):
        ids = _object_mask().astype(np.int64) * (cls + 1)
        meta = SampleMeta(cls, cls + 1, CLASS_NAMES[cls], None, None, "test", "validation", "toy")
        writer.write(EncodedSample(key, "image.png", encode_png(_pixels(i)), encode_mask(ids), meta))
    return writer.write_manifest(CLASS_NAMES, [], {"command": "test"})


def _ranks(key: str, block: int) -> np.ndarray:
    rank = np.full(TOKENS, 2, dtype=np.int32)
    if key == "a0" and block == BLOCKS:
        rank[list(RANK0_TOKENS)] = 0
    return rank


def _tokens_columns() -> dict[str, object]:
    cols: dict[str, list] = {name: [] for name in (
        "image_key", "block", "stream", "token", "token_kind", "label", "fg_fraction", "identifiability_rank",
        "correct_logit", "sublayer_input_correct_logit", "key_value_agreement", "non_compositional")}
    top5 = []
    for key, (cls, _) in IMAGES.items():
        for block in range(BLOCKS + 1):
            rank = _ranks(key, block)
            for token in range(TOKENS):
                cols["image_key"].append(key)
                cols["block"].append(block)
                cols["stream"].append("resid")
                cols["token"].append(token)
                cols["token_kind"].append("cls" if token < PREFIX else "image")
                cols["label"].append("prefix" if token < PREFIX else "class" if token == PREFIX + 1 else "context")
                cols["fg_fraction"].append(None if token < PREFIX else float(token == PREFIX + 1))
                cols["identifiability_rank"].append(int(rank[token]))
                cols["correct_logit"].append(1.0)
                cols["sublayer_input_correct_logit"].append(None)
                cols["key_value_agreement"].append(None)
                cols["non_compositional"].append(None)
                top1 = cls if rank[token] == 0 else (cls + 1) % CLASSES
                top5.append([top1] + [c for c in range(CLASSES + 1) if c != top1][:4])
    cols["top5_class"] = np.array(top5, dtype=np.int16)
    cols["top5_logit"] = np.zeros((len(top5), 5), dtype=np.float16)
    return cols


def _explain_columns() -> dict[str, object]:
    cols: dict[str, list] = {name: [] for name in (
        "image_key", "class_of_interest", "method", "block", "token", "label", "fg_fraction", "importance",
        "head_importance")}

    def add(method: str, block: int | None, token: int, importance: float, heads: list[float] | None) -> None:
        for name, value in zip(cols, ("a0", 0, method, block, token, "context", 0.0, importance, heads)):
            cols[name].append(value)

    for token in range(PREFIX, TOKENS):
        for block in range(1, BLOCKS + 1):
            add("ours", block, token, float(token * block), [float(token), float(token * block - token)])
        add("chefer", None, token, float(TOKENS - token), None)
    return cols


def _runs_columns(manifest: Path) -> dict[str, object]:
    now = datetime(2024, 1, 1, tzinfo=timezone.utc)
    spec = {"name": "gallery", "variants": ["toy"], "data": {"manifest": str(manifest), "shards": [], "verify": True}}
    return {"run_id": ["r1"], "job_name": ["gallery"], "job_spec": [json.dumps(spec)], "versions": ["{}"],
            "started_at": [now], "status": ["done"], "finished_at": [now], "wall_seconds": [1.0], "device": ["cpu"],
            "actors": [1], "shards_total": [1], "shards_done": [1], "shards_skipped": [0], "shards_failed": [0],
            "rows_written": [1], "analysis_seconds": [1.0], "experiment_seconds": ["{}"], "samples_rejected": ["{}"]}


@pytest.fixture()
def result_set(tmp_path: Path) -> Path:
    """The hand-made result set at tmp_path/results (shard and manifest at tmp_path/shards)."""
    manifest = _write_shard(tmp_path / "shards")
    root = tmp_path / "results"
    stem = "toy-validation-000000"
    images = {"image_key": list(IMAGES), "shard": [stem] * len(IMAGES),
              "class_index": [c for c, _ in IMAGES.values()],
              "class_name": [CLASS_NAMES[c] for c, _ in IMAGES.values()],
              "prediction": [p for _, p in IMAGES.values()], "correct": [c == p for c, p in IMAGES.values()],
              "num_image_tokens": [ROWS * COLS] * len(IMAGES), "num_class_tokens": [1] * len(IMAGES),
              "num_context_tokens": [ROWS * COLS - 1] * len(IMAGES)}
    write_parquet_atomic(to_table("images", images), table_file(root, "images", "toy", "baseline", stem))
    write_parquet_atomic(to_table("tokens", _tokens_columns()), table_file(root, "tokens", "toy", "baseline", stem))
    write_parquet_atomic(to_table("explain", _explain_columns()), table_file(root, "explain", "toy", "explain", stem))
    write_parquet_atomic(to_table("runs", _runs_columns(manifest)), table_file(root, "runs", "all", "none", "r1"))
    variants = {"family": ["vit"], "num_blocks": [BLOCKS], "num_prefix_tokens": [PREFIX], "grid_rows": [ROWS],
                "grid_cols": [COLS], "input_height": [HEIGHT], "input_width": [WIDTH], "num_classes": [CLASSES],
                "data_config": [json.dumps(DATA_CONFIG)], "class_names": [CLASS_NAMES]}
    write_parquet_atomic(to_table("variants", variants), table_file(root, "variants", "toy", "none", "variant"))
    return root


# ------------------------------------------------------------------------------------------ pure parts


def test_token_grid_drops_the_prefix_and_is_row_major():
    grid = token_grid(np.arange(TOKENS), ROWS, COLS, PREFIX)
    assert grid.tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="expected 7 token values"):
        token_grid(np.arange(TOKENS - 1), ROWS, COLS, PREFIX)


def test_rank0_cells_land_at_their_grid_positions():
    rank = token_grid(_ranks("a0", BLOCKS), ROWS, COLS, PREFIX)
    assert np.argwhere(rank == 0).tolist() == [[0, 1], [1, 2]]
    scores = identifiability_scores(rank, CLASSES)
    assert scores[0, 1] == 1.0 and scores[1, 2] == 1.0 and scores[0, 0] == pytest.approx(0.5)
    assert np.isnan(identifiability_scores(np.array([-1]), CLASSES)[0])


def test_drawn_cells_have_the_colour_of_their_score(tmp_path: Path):
    """Pixel check: an axes filling a 48 × 32 pixel figure, one 16-pixel square per cell."""
    import matplotlib.pyplot as plt

    scores = np.array([[0.0, 1.0, 0.25], [0.5, np.nan, 0.75]])
    fig = plt.figure(figsize=(WIDTH / 10, HEIGHT / 10), dpi=10)
    ax = fig.add_axes((0, 0, 1, 1))
    norm = Normalize(0.0, 1.0)
    draw_cells(ax, scores, VARIANT, SCORE_CMAP, norm)
    ax.set_axis_off()
    fig.savefig(tmp_path / "cells.png", dpi=10)
    plt.close(fig)
    drawn = np.asarray(Image.open(tmp_path / "cells.png").convert("RGB")).astype(int)
    assert drawn.shape == (HEIGHT, WIDTH, 3)
    cmap = matplotlib.colormaps[SCORE_CMAP]
    for r in range(ROWS):
        for c in range(COLS):
            pixel = drawn[16 * r + 4: 16 * r + 12, 16 * c + 4: 16 * c + 12].reshape(-1, 3)
            if np.isnan(scores[r, c]):
                expected = np.array([255, 255, 255])  # no token: the white background
            else:
                expected = np.round(np.array(cmap(norm(scores[r, c]))[:3]) * 255)
            assert np.abs(pixel - expected).max() <= 2, (r, c, pixel[0], expected)


def test_outline_of_the_class_labelled_cells():
    one = np.zeros((ROWS, COLS), dtype=bool)
    one[0, 1] = True
    assert sorted(label_outline_segments(one, 16, 16)) == sorted([
        ((16, 0), (32, 0)), ((16, 16), (32, 16)), ((16, 0), (16, 16)), ((32, 0), (32, 16))])
    two = one.copy()
    two[0, 2] = True
    segments = label_outline_segments(two, 16, 16)
    assert len(segments) == 6 and ((32, 0), (32, 16)) not in segments  # the shared edge is inside


def test_top1_colours_true_class_first():
    top1 = np.array([[0, 1, 3], [3, 3, -1]])
    rgb, legend = top1_colour_grid(top1, true_class=0, prediction=1)
    assert [cls for cls, _ in legend] == [0, 1, 3]
    assert np.allclose(rgb[0, 0], (0.0, 114 / 255, 178 / 255)) and np.isnan(rgb[1, 2]).all()


def test_select_first_k_per_class_correct_and_misclassified():
    images = [ImageInfo(k, "s", c, None, p, c == p) for k, (c, p) in IMAGES.items()]
    assert select_keys(images, per_class=1, max_images=8) == ["a0", "a2", "b0", "b1", "c0"]
    assert select_keys(images, per_class=2, max_images=8) == ["a0", "a2", "b0", "b1", "a1", "c0"]
    assert select_keys(images, per_class=1, max_images=3) == ["a0", "a2", "b0"]
    only_correct = [i for i in images if i.correct]
    assert select_keys(only_correct, per_class=1, max_images=8) == ["a0", "b0"]


def test_block_panels_keep_first_and_last():
    assert block_panels(2) == [0, 1, 2]
    panels = block_panels(24, limit=7)
    assert panels[0] == 0 and panels[-1] == 24 and len(panels) == 7


# ------------------------------------------------------------------------------------------ images and files


def test_sample_is_re_read_from_its_shard_through_the_eval_transform(result_set: Path, tmp_path: Path):
    url = str(tmp_path / "shards" / "toy-validation-000000.tar")
    lookup = load_sample(url, "toy-validation-000000", "b0", DATA_CONFIG)
    assert lookup.reason is None and lookup.image is not None
    assert np.array_equal(lookup.image.pixels, _pixels(3))
    assert np.array_equal(lookup.image.object_mask, _object_mask())
    assert lookup.image.meta["class_index"] == 1
    missing = load_sample(url, "toy-validation-000000", "zz", DATA_CONFIG)
    assert missing.image is None and "no sample zz" in missing.reason


def test_write_gallery_draws_token_and_explain_figures(result_set: Path, tmp_path: Path):
    out = tmp_path / "report"
    figures = write_gallery(result_set, out, GallerySelection(max_images=3))
    assert [(f.image_key, Path(f.path).name) for f in figures] == [
        ("a0", "a0-tokens.png"), ("a0", "a0-explain.png"), ("a2", "a2-tokens.png"), ("b0", "b0-tokens.png")]
    for figure in figures:
        assert figure.variant == "toy" and figure.path.startswith("gallery/toy/")
        assert (out / figure.path).read_bytes().startswith(PNG_MAGIC)
        assert "without the image" not in figure.caption
    assert "misclassified as square" in figures[2].caption
    assert "chefer" in figures[1].caption
    page, markdown = gallery_html(figures), gallery_markdown(figures)
    assert page.count("<img") == 4 and 'src="gallery/toy/a0-tokens.png"' in page
    assert "(gallery/toy/b0-tokens.png)" in markdown and markdown.startswith("### toy")


def test_explicit_keys_and_unknown_ones(result_set: Path, tmp_path: Path):
    figures = write_gallery(result_set, tmp_path / "r", GallerySelection(keys=("c0",)))
    assert [f.image_key for f in figures] == ["c0"]
    from vitlens.errors import UserError

    with pytest.raises(UserError, match="'nope'"):
        write_gallery(result_set, tmp_path / "r", GallerySelection(keys=("nope",)))
    with pytest.raises(UserError, match="'other'"):
        write_gallery(result_set, tmp_path / "r", GallerySelection(variants=("other",)))


def test_missing_shard_gives_maps_without_the_image(result_set: Path, tmp_path: Path):
    (tmp_path / "shards" / "toy-validation-000000.tar").unlink()
    figures = write_gallery(result_set, tmp_path / "r", GallerySelection(keys=("a0",)))
    assert len(figures) == 2
    for figure in figures:
        assert (tmp_path / "r" / figure.path).is_file()
        assert "Drawn without the image" in figure.caption and "is gone" in figure.caption
        assert "class-labelled tokens" in figures[0].caption
    shutil.rmtree(tmp_path / "shards")  # the manifest too: no URL for the shard at all
    figures = write_gallery(result_set, tmp_path / "r2", GallerySelection(keys=("b0",)))
    assert len(figures) == 1 and "no run's job spec names shard toy-validation-000000" in figures[0].caption


def test_summary_tier_says_the_gallery_needs_tokens(result_set: Path, tmp_path: Path):
    shutil.rmtree(result_set / "table=tokens")
    figures = write_gallery(result_set, tmp_path / "r", GallerySelection(keys=("a0", "b0")))
    assert figures[0].path is None and 'detail = "tokens"' in figures[0].caption
    assert [Path(f.path).name for f in figures[1:]] == ["a0-explain.png"]  # the explain maps still drawn
    assert 'class="gallery-note"' in gallery_html(figures)


def test_without_a_variants_row_a_note(result_set: Path, tmp_path: Path):
    shutil.rmtree(result_set / "table=variants")
    figures = write_gallery(result_set, tmp_path / "r", GallerySelection(keys=("a0",)))
    assert len(figures) == 1 and figures[0].path is None and "`variants` row" in figures[0].caption


# ------------------------------------------------------------------------------------------ the CLI


def test_show_writes_the_figures_of_one_image(result_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "show"
    assert cli_main(["show", "a0", "--results", str(result_set), "--variant", "toy", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "a0-tokens.png"), str(out / "a0-explain.png")]
    assert all(Path(p).read_bytes().startswith(PNG_MAGIC) for p in printed)


def test_show_refuses_an_unknown_key_or_variant(result_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert cli_main(["show", "zz9", "--results", str(result_set), "--variant", "toy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "zz9" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["show", "a0", "--results", str(result_set), "--variant", "vit_b99", "--out", str(tmp_path)]) == 2
    assert "vit_b99" in capsys.readouterr().err


def test_report_gallery_options():
    from vitlens.cli import build_parser
    from vitlens.cli.report import gallery_selection

    parser = build_parser()
    args = parser.parse_args(["report", "--results", "r", "--out", "o", "--gallery-keys", "a0", "b1",
                              "--gallery-per-class", "2"])
    assert gallery_selection(args) == GallerySelection(keys=("a0", "b1"), per_class=2)
    assert gallery_selection(parser.parse_args(["report", "--results", "r", "--out", "o"])) == GallerySelection()
    assert gallery_selection(parser.parse_args(["report", "--results", "r", "--out", "o", "--no-gallery"])) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--results", "r", "--out", "o", "--gallery-per-class", "0"])


def test_token_maps_read_from_the_shard_file_or_the_view_agree(result_set: Path):
    from vitlens.report.gallery import ResultSet

    info = ImageInfo("a0", "toy-validation-000000", 0, "circle", 0, True)
    results = ResultSet(result_set)
    try:
        direct = results.token_maps(VARIANT, "baseline", info)
        explain = results.explain_maps(VARIANT, info)
    finally:
        results.close()
    rank = token_grid(direct.rank[BLOCKS], ROWS, COLS, PREFIX)
    assert np.argwhere(rank == 0).tolist() == [[0, 1], [1, 2]] and (direct.rank[:BLOCKS] == 2).all()
    assert token_grid(direct.label, ROWS, COLS, PREFIX)[0].tolist() == ["context", "class", "context"]
    assert token_grid(direct.top1[BLOCKS], ROWS, COLS, PREFIX).tolist() == [[1, 0, 1], [1, 1, 0]]
    assert explain is not None and sorted(explain.ours_blocks) == [1, 2]
    assert token_grid(explain.ours_global, ROWS, COLS, PREFIX).tolist() == [[3, 6, 9], [12, 15, 18]]
    assert explain.ours_heads[2].shape == (2, TOKENS) and explain.chefer[PREFIX] == TOKENS - PREFIX
    # a shard id without its own file (another layout): the same rows through the view
    stored = table_file(result_set, "tokens", "toy", "baseline", "toy-validation-000000")
    stored.rename(stored.with_name("elsewhere.parquet"))
    results = ResultSet(result_set)
    try:
        via_view = results.token_maps(VARIANT, "baseline", info)
    finally:
        results.close()
    assert np.array_equal(via_view.rank, direct.rank) and np.array_equal(via_view.top1, direct.top1)


def test_vitlens_report_writes_and_links_the_gallery(result_set: Path, tmp_path: Path):
    out = tmp_path / "report"
    assert cli_main(["report", "--results", str(result_set), "--out", str(out), "--no-progress",
                     "--gallery-keys", "b1"]) == 0
    assert sorted(p.name for p in (out / "gallery").rglob("*.png")) == ["b1-tokens.png"]
    assert "gallery/toy/b1-tokens.png" in (out / "index.html").read_text()
    assert cli_main(["report", "--results", str(result_set), "--out", str(tmp_path / "plain"), "--no-progress",
                     "--no-gallery"]) == 0
    assert not (tmp_path / "plain" / "gallery").exists()
