"""Job spec validation: good specs load, every mistake names the key or file."""

from pathlib import Path

import pytest

from vitlens.errors import UserError
from vitlens.runner.spec import ExplainSpec, load_job_spec

GOOD = """
name = "t"
output = "out"
variants = ["a", "b@random"]
experiments = ["baseline", "attn_self_only"]
batch_size = 8
[data]
manifest = "shards/manifest.json"
[resources]
device = "cpu"
cpus_per_actor = 1
max_actors = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_good_spec_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, GOOD))
    assert spec.variants == ("a", "b@random")
    assert spec.experiments == ("baseline", "attn_self_only")
    assert spec.batch_size == 8
    assert spec.output == str((tmp_path / "out").resolve())
    assert spec.data.manifest == str((tmp_path / "shards/manifest.json").resolve())
    assert spec.resources.max_actors == 2


def test_explain_settings_load_with_defaults(tmp_path: Path) -> None:
    assert load_job_spec(write(tmp_path, GOOD)).explain == ExplainSpec("true", "resid", 0)
    text = GOOD + '[explain]\ntarget = "predicted"\nsource = "attn"\ncurve_points = 11\n'
    assert load_job_spec(write(tmp_path, text)).explain == ExplainSpec("predicted", "attn", 11)


def test_urls_are_not_resolved(tmp_path: Path) -> None:
    text = GOOD.replace('manifest = "shards/manifest.json"', 'shards = ["https://x/a-000000.tar", "/abs/b.tar"]')
    spec = load_job_spec(write(tmp_path, text))
    assert spec.data.shards == ("https://x/a-000000.tar", "/abs/b.tar")


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (("batch_size = 8", "batch_size = 8\ncolour = 3"), "colour"),
        (('name = "t"\n', ""), "'name'"),
        (("batch_size = 8", 'batch_size = "8"'), "batch_size"),
        (('"attn_self_only"]', '"attn_self_only", "nope"]'), "nope"),
        (('device = "cpu"', 'device = "tpu"'), "resources.device"),
        (("max_actors = 2", "max_actors = 2\ngpus = 1"), "gpus"),
        (('manifest = "shards/manifest.json"', 'manifest = "m.json"\nshards = ["a.tar"]'), "exactly one"),
        (('variants = ["a", "b@random"]', "variants = []"), "variants"),
        (("name", "name = ["), "TOML"),
        (("max_actors = 2", "max_actors = 2\n[explain]\ntarget = \"mine\""), "explain.target"),
        (("max_actors = 2", "max_actors = 2\n[explain]\nsource = \"mlp\""), "explain.source"),
        (("max_actors = 2", "max_actors = 2\n[explain]\ncurve_points = 1"), "explain.curve_points"),
        (("max_actors = 2", "max_actors = 2\n[explain]\ncurve_points = \"all\""), "explain.curve_points"),
        (("max_actors = 2", "max_actors = 2\n[explain]\nsteps = 3"), "steps"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, edit: tuple[str, str], fragment: str) -> None:
    old, new = edit
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    with pytest.raises(UserError, match=fragment):
        load_job_spec(write(tmp_path, text))


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_job_spec(tmp_path / "nope.toml")


def test_variants_are_checked_before_any_actor_starts(tmp_path: Path) -> None:
    from vitlens.runner.shard_job import check_variants

    def spec(variants: str, checkpoints: str = "") -> object:
        text = GOOD.replace('variants = ["a", "b@random"]', f"variants = {variants}") + checkpoints
        return load_job_spec(write(tmp_path, text))

    check_variants(spec('["shapes_vit_p16", "shapes_vit_p16@random", "vit_b32@random"]'))
    with pytest.raises(UserError, match="unknown model variant 'nope'"):
        check_variants(spec('["nope"]'))
    with pytest.raises(UserError, match=r"\[checkpoints\]"):
        check_variants(spec('["vit_cifar100"]'))
    with pytest.raises(UserError, match="does not exist"):
        check_variants(spec('["vit_cifar100"]', '[checkpoints]\nvit_cifar100 = "missing.pth"\n'))
    with pytest.raises(UserError, match="not in 'variants'"):
        spec('["vit_b32"]', '[checkpoints]\nvit_cifar100 = "x.pth"\n')
