"""`vitlens models check` and `vitlens.models.coverage`: one row per model, exit codes, and
the statuses the coverage sweep counts."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitlens.cli import main
from vitlens.lens.parity import ParityResult
from vitlens.models import coverage
from vitlens.models.registry import VariantSpec, get_variant

# the real timm architectures, cut to 2 blocks at a few tokens (instant to build and run)
SHRINK = {
    "deit_tiny_patch16_224": dict(img_size=32, depth=2),
    "vit_small_patch14_dinov2": dict(img_size=28, depth=2),
    "vit_relpos_small_patch16_224": dict(img_size=32, depth=2),
}


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """`NAME@random` specs with the `SHRINK` kwargs (the CLI and the rows share `random_spec`)."""
    original = coverage.random_spec

    def shrunk(name: str) -> VariantSpec:
        spec = original(name)
        shrink = SHRINK.get(name.removesuffix("@random"), {})
        return dataclasses.replace(spec, model_kwargs={**spec.model_kwargs, **shrink})

    monkeypatch.setattr(coverage, "random_spec", shrunk)


def test_one_ok_one_refused_rows_and_exit_code(tiny: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "check", "deit_tiny_patch16_224", "vit_small_patch14_dinov2"]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["MODEL", "FAMILY", "PARAMS", "PARITY", "PREFIX", "GRID", "CELL", "EXPERIMENTS"]
    ok = out[1].split()
    assert ok[:2] == ["deit_tiny_patch16_224", "vit"] and ok[3:7] == ["ok", "1", "2x2", "16x16"]
    assert ok[7] == "all"
    refused = out[2]
    assert refused.startswith("vit_small_patch14_dinov2") and "refused: " in refused
    assert "headless" in refused and "--head FILE" in refused
    assert out[-1] == "2 model(s): 1 ok, 1 refused"

    assert main(["models", "check", "deit_tiny_patch16_224"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 model(s): 1 ok"


def test_skipped_experiments_are_listed_with_reasons(tiny: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "check", "vit_relpos_small_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "all but attn_no_cls[1]" in out
    assert "[1] attn_no_cls does not apply: " in out


def test_headless_gets_classes_in_all_timm_mode_and_says_so(tiny: None) -> None:
    row = coverage.check_model("vit_small_patch14_dinov2", headless_classes=1000)
    assert row.status == "ok" and row.note == "headless: checked with num_classes=1000"
    assert (row.prefix, row.grid, row.cell, row.family) == (1, (2, 2), (14, 14), "vit")
    refused = coverage.check_model("vit_small_patch14_dinov2")
    assert refused.status == "refused" and refused.model_class == "VisionTransformer" and refused.params


def test_head_file_on_the_command_line(tiny: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head = tmp_path / "head.pth"
    torch.save({"weight": torch.randn(4, 384), "bias": torch.randn(4)}, head)
    assert main(["models", "check", "vit_small_patch14_dinov2", "--head", str(head)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[3] == "ok"
    torch.save({"weight": torch.randn(4, 100)}, head)
    assert main(["models", "check", "vit_small_patch14_dinov2", "--head", str(head)]) == 3
    assert "[4, 100], the model's head takes [4, 384]" in capsys.readouterr().out


def test_statuses_wrong_crash_too_large(tiny: None, monkeypatch: pytest.MonkeyPatch) -> None:
    row = coverage.check_model("deit_tiny_patch16_224", max_params=1000)
    assert row.status == "too_large" and row.params == _count(_meta("deit_tiny_patch16_224", img_size=32, depth=2))
    assert row.reason.endswith("parameters > the limit of 1,000") and row.forward_error is None

    monkeypatch.setattr(coverage, "check_parity", lambda model, images: ParityResult(0.5, 0.0, 2.0))
    row = coverage.check_model("deit_tiny_patch16_224")
    assert row.status == "wrong" and "forward error 5.00e-01" in row.reason and row.forward_error == 0.5

    def broken(model: torch.nn.Module, images: torch.Tensor) -> ParityResult:
        raise RuntimeError("shape mismatch in block 3\nsecond line")

    monkeypatch.setattr(coverage, "check_parity", broken)
    row = coverage.check_model("deit_tiny_patch16_224")
    assert (row.status, row.reason) == ("crash", "second line")


def test_user_mistakes_are_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv, fragment in (
        (["models", "check", "deit_tiny_patch16_224", "no_such_vit"], "unknown model variant 'no_such_vit'"),
        (["models", "check"], "give one or more model names"),
        (["models", "check", "vit_b32", "--all-timm"], "not both"),
        (["models", "check", "vit_b32", "vit_b16", "--head", "h.pth"], "--head FILE gives the head of one model"),
        (["models", "check", "vit_b32", "--head", str(tmp_path / "h.pth")], "head file not found"),
    ):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # refused before any row is printed
        err = captured.err.strip()
        assert err.startswith("vitlens models: error: ") and fragment in err and "\n" not in err
    with pytest.raises(SystemExit) as caught:
        main(["models", "check", "vit_b32", "--max-params", "lots"])
    assert caught.value.code == 2


def test_all_timm_covers_the_vit_modules() -> None:
    names = coverage.timm_models()
    assert "vit_base_patch16_224" in names and "eva02_tiny_patch14_224" in names and "xcit_nano_12_p16_224" in names
    assert "resnet50" not in names and "swin_tiny_patch4_window7_224" not in names
    assert {coverage.timm_module_of(n) for n in names} == set(coverage.COVERED_MODULES)


def test_the_module_prints_one_json_row(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vitlens.models.coverage", "vit_large_patch16_224", "--max-params", "100M"],
        capture_output=True, text=True, timeout=120, env={"HOME": str(tmp_path), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    row = coverage.CoverageRow.from_json(json.loads(result.stdout))
    assert (row.name, row.status, row.timm_module, row.model_class) == (
        "vit_large_patch16_224", "too_large", "vision_transformer", "VisionTransformer")
    assert row.params == _count(_meta("vit_large_patch16_224")) == 304_326_632


def _meta(name: str, **kwargs: int) -> torch.nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names_are_checked_as_their_random_twin() -> None:
    assert coverage.random_spec("vit_b32").name == "vit_b32@random"
    assert coverage.random_spec("vit_b32@random").weights == "random"
    assert get_variant("vit_b32").weights == "hub"
