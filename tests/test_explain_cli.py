"""`vitlens explain` writes one PNG per (block, head) asked for plus the global map, and
names the offending file / option / model on bad input (exit 2)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitlens.cli import main
from vitlens.data.shapes import iter_shapes_samples


@pytest.fixture(scope="module")
def shape_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sample = next(iter_shapes_samples(20, 1, 64, 7, "test", 0.5))
    path = tmp_path_factory.mktemp("img") / "shape.png"
    Image.fromarray(sample.image).save(path)
    return path


def test_explain_writes_block_head_and_global_heatmaps(shape_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    assert main(["explain", str(shape_png), "--variant", "shapes_vit_p16", "--blocks", "2", "6",
                 "--class", "solid_circle", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    # shapes_vit_p16 has 3 heads: 2 blocks x 3 heads + global
    assert names == ["block02_head01.png", "block02_head02.png", "block02_head03.png",
                     "block06_head01.png", "block06_head02.png", "block06_head03.png", "global.png"]
    with Image.open(out / "global.png") as picture:
        assert picture.format == "PNG" and min(picture.size) >= 100
        assert np.asarray(picture).std() > 0


@pytest.mark.parametrize("argv, message", [
    (["--variant", "shapes_vit_gap_p8"], "CLS"),
    (["--variant", "shapes_vit_p16", "--class", "no_such_class"], "--class"),
    (["--variant", "shapes_vit_p16", "--blocks", "7"], "--blocks"),
])
def test_explain_rejects_bad_input(shape_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                   argv: list[str], message: str) -> None:
    assert main(["explain", str(shape_png), *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_explain_names_an_unreadable_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.png"
    assert main(["explain", str(missing), "--variant", "shapes_vit_p16", "--out", str(tmp_path)]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_explain_beyond_paper_options(shape_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--ln frozen --loss logit` draws the same set of maps and names the method it used."""
    out = tmp_path / "maps"
    assert main(["explain", str(shape_png), "--variant", "shapes_vit_p16", "--blocks", "6", "--ln", "frozen",
                 "--loss", "logit", "--out", str(out)]) == 0
    assert "method ours[ln=frozen,loss=logit]" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == [
        "block06_head01.png", "block06_head02.png", "block06_head03.png", "global.png"]
    with pytest.raises(SystemExit) as exit_info:  # argparse's own refusal of an unknown choice
        main(["explain", str(shape_png), "--variant", "shapes_vit_p16", "--ln", "fixed", "--out", str(out)])
    assert exit_info.value.code == 2 and "--ln" in capsys.readouterr().err
