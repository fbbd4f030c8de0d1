"""Job spec validation: good specs load, every mistake names the key or file."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vitlens.errors import UserError
from vitlens.runner.spec import DataSpec, ExplainSpec, JobSpec, ResourceSpec, load_job_spec

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
    from vitlens.runner.preflight import check_checkpoint_files
    from vitlens.runner.variant_check import variant_problems

    def spec(variants: str, checkpoints: str = "") -> JobSpec:
        text = GOOD.replace('variants = ["a", "b@random"]', f"variants = {variants}") + checkpoints
        return load_job_spec(write(tmp_path, text))

    assert variant_problems(spec('["shapes_vit_p16", "shapes_vit_p16@random", "vit_b32@random"]')) == []
    assert "unknown model variant 'nope'" in " ".join(variant_problems(spec('["nope"]')))
    assert "[checkpoints]" in " ".join(variant_problems(spec('["vit_cifar100"]')))
    with pytest.raises(UserError, match="does not exist"):
        check_checkpoint_files(spec('["vit_cifar100"]', '[checkpoints]\nvit_cifar100 = "missing.pth"\n'))
    with pytest.raises(UserError, match="not in 'variants'"):
        spec('["vit_b32"]', '[checkpoints]\nvit_cifar100 = "x.pth"\n')
    (no_adapter,) = variant_problems(spec('["resnet18@random"]'))
    assert no_adapter.startswith("variant 'resnet18@random': the lens has no adapter for ResNet (supported")
    headless = variant_problems(spec('["vit_small_patch14_dinov2@random"]'))
    assert len(headless) == 1 and headless[0].startswith("variant 'vit_small_patch14_dinov2@random': ")
    assert "headless" in headless[0]
    fixed = '[models."vit_small_patch14_dinov2@random"]\nnum_classes = 10\nimg_size = 28\ndepth = 1\n'
    assert variant_problems(spec('["vit_small_patch14_dinov2@random"]', fixed)) == []


HEADS_AND_MODELS = GOOD + """
[heads]
a = "heads/a.pth"
[models.a]
img_size = 224
[models."b@random"]
num_classes = 1000
img_size = 224
dynamic_img_size = true
act_layer = "gelu"
drop_rate = 0.0
"""


def test_heads_and_models_tables_load(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, HEADS_AND_MODELS))
    assert spec.heads == (("a", str((tmp_path / "heads/a.pth").resolve())),)
    assert spec.head_for("a") == str((tmp_path / "heads/a.pth").resolve()) and spec.head_for("b@random") is None
    assert spec.model_kwargs_for("b@random") == {
        "num_classes": 1000, "img_size": 224, "dynamic_img_size": True, "act_layer": "gelu", "drop_rate": 0.0}
    assert spec.model_kwargs_for("a") == {"img_size": 224} and load_job_spec(write(tmp_path, GOOD)).models == ()
    in_code = JobSpec(name="t", output="o", variants=("a",), data=DataSpec(shards=("x.tar",)),
                      models={"a": {"num_classes": 3}}, heads=[("a", "h.pth")])  # type: ignore[arg-type]
    assert in_code.models == (("a", (("num_classes", 3),)),) and in_code.heads == (("a", "h.pth"),)
    assert dataclasses.replace(in_code) == in_code  # the frozen form is accepted again as it is


@pytest.mark.parametrize("extra, fragment", [
    ('[heads]\nc = "h.pth"\n', "'heads.c' names a variant that is not in 'variants'"),
    ("[models.c]\nnum_classes = 3\n", "'models.c' names a variant that is not in 'variants'"),
    ("[models]\na = 3\n", "'models.a' must be a table of timm keyword arguments, not 3"),
    ("[models.a]\nnum_classes = 0\n", "'models.a.num_classes' must be an integer >= 1, not 0"),
    ("[models.a]\nimg_size = [224, 224]\n", "'models.a.img_size' must be a number, string or boolean"),
    ("[models.a.norm]\neps = 1e-6\n", "'models.a.norm' must be a number, string or boolean"),
    ("[models.a]\npretrained = true\n", "'models.a.pretrained' must be left out"),
])
def test_heads_and_models_mistakes_name_the_key(tmp_path: Path, extra: str, fragment: str) -> None:
    path = write(tmp_path, GOOD + extra)
    with pytest.raises(UserError) as caught:
        load_job_spec(path)
    assert str(caught.value).startswith(f"{path}: ") and fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_heads_and_models_built_in_code_are_checked() -> None:
    data = DataSpec(shards=("x.tar",))
    with pytest.raises(UserError, match=re.escape("job spec: 'models.a.num_classes' must be an integer >= 1, not 1.5")):
        JobSpec(name="t", output="o", variants=("a",), data=data, models={"a": {"num_classes": 1.5}})
    with pytest.raises(UserError, match=re.escape("job spec: 'heads.a' must be a non-empty string, not 3")):
        JobSpec(name="t", output="o", variants=("a",), data=data, heads=(("a", 3),))  # type: ignore[arg-type]
    with pytest.raises(UserError, match="'models.b' names a variant that is not in 'variants'"):
        JobSpec(name="t", output="o", variants=("a",), data=data, models={"b": {}})


# Every key of every table: one bad value each, and the exact one-line message that names
# the file, the key, what it must be and what it was (TOML spelling).
BAD_VALUES = [
    # top level
    ("name", "3", "a non-empty string"),
    ("name", '""', "a non-empty string"),
    ("output", "[1]", "a non-empty string"),
    ("variants", '"a"', "a non-empty list of non-empty strings"),
    ("variants", '["a", ""]', "a non-empty list of non-empty strings"),
    ("variants", "[1]", "a non-empty list of non-empty strings"),
    ("experiments", '"baseline"', "a non-empty list of non-empty strings"),
    ("experiments", '[""]', "a non-empty list of non-empty strings"),
    ("experiments", "[]", "a non-empty list of non-empty strings"),
    ("batch_size", "0", "an integer >= 1"),
    ("batch_size", "1.5", "an integer >= 1"),
    ("batch_size", "true", "an integer >= 1"),
    # [data]
    ("data.manifest", "3", "a non-empty string"),
    ("data.manifest", "[]", "a non-empty string"),
    ("data.shards", "[]", "a non-empty list of non-empty strings"),
    ("data.shards", '"a.tar"', "a non-empty list of non-empty strings"),
    ("data.shards", "[1]", "a non-empty list of non-empty strings"),
    ("data.verify", '"no"', "true or false"),
    ("data.verify", "0", "true or false"),
    # [resources]
    ("resources.device", '"tpu"', "one of ['auto', 'cpu', 'cuda']"),
    ("resources.device", "1", "one of ['auto', 'cpu', 'cuda']"),
    ("resources.cpus_per_actor", '"1"', "a number > 0"),
    ("resources.cpus_per_actor", "0", "a number > 0"),
    ("resources.cpus_per_actor", "-0.5", "a number > 0"),
    ("resources.cpus_per_actor", "true", "a number > 0"),
    ("resources.max_actors", "1.5", "an integer >= 1"),
    ("resources.max_actors", "0", "an integer >= 1"),
    ("resources.max_actors", '"2"', "an integer >= 1"),
    ("resources.max_actors", "true", "an integer >= 1"),
    ("resources.max_task_retries", '"2"', "an integer >= 0"),
    ("resources.max_task_retries", "-1", "an integer >= 0"),
    ("resources.max_task_retries", "1.0", "an integer >= 0"),
    ("resources.max_task_retries", "false", "an integer >= 0"),
    ("resources.max_actor_restarts", "-3", "an integer >= 0"),
    ("resources.max_actor_restarts", '"2"', "an integer >= 0"),
    # [explain]
    ("explain.target", "1", "one of ['true', 'predicted']"),
    ("explain.source", "true", "one of ['resid', 'attn']"),
    ("explain.curve_points", "-1", "0 (every kept count) or an integer >= 2"),
    ("explain.curve_points", "true", "0 (every kept count) or an integer >= 2"),
    ("explain.curve_points", "2.5", "0 (every kept count) or an integer >= 2"),
    # [checkpoints]
    ("checkpoints.a", "3", "a non-empty string"),
    ("checkpoints.a", '""', "a non-empty string"),
    # [heads]
    ("heads.a", "3", "a non-empty string"),
    ("heads.a", '""', "a non-empty string"),
    ("heads.a", '["h.pth"]', "a non-empty string"),
    # [models.NAME]
    ("models.a", "3", "a table of timm keyword arguments"),
    ("models.a.num_classes", "0", "an integer >= 1"),
    ("models.a.num_classes", '"10"', "an integer >= 1"),
    ("models.a.num_classes", "true", "an integer >= 1"),
    ("models.a.img_size", "[224, 224]", "a number, string or boolean (a timm keyword argument)"),
]


def set_key(text: str, dotted: str, value: str) -> str:
    """`text` with `dotted` (`key` or `table.key`) set to the TOML `value`."""
    table, _, key = dotted.rpartition(".")
    lines = [line for line in text.splitlines() if not (line.split("=")[0].strip() == key)]
    if not table:
        return f"{key} = {value}\n" + "\n".join(lines) + "\n"
    out, header, done = [], f"[{table}]", False
    for line in lines:
        out.append(line)
        if line.strip() == header:
            out.append(f"{key} = {value}")
            done = True
    if not done:
        out += [header, f"{key} = {value}"]
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("key, value, must", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_every_key_is_type_and_range_checked(tmp_path: Path, key: str, value: str, must: str) -> None:
    if key == "data.shards":  # shards replace the manifest ([data] takes exactly one)
        text = set_key(GOOD.replace('manifest = "shards/manifest.json"\n', ""), key, value)
    else:
        text = set_key(GOOD, key, value)
    path = write(tmp_path, text)
    with pytest.raises(UserError) as caught:
        load_job_spec(path)
    message = str(caught.value)
    assert message == f"{path}: '{key}' must be {must}, not {value}"
    assert "\n" not in message


@pytest.mark.parametrize("table", ["data", "resources", "explain", "checkpoints", "heads", "models"])
def test_a_table_that_is_not_a_table_is_named(tmp_path: Path, table: str) -> None:
    text = GOOD.replace("[data]\n", "").replace("[resources]\n", "")
    text = text.replace('manifest = "shards/manifest.json"', "").replace('device = "cpu"', "")
    text = text.replace("cpus_per_actor = 1", "").replace("max_actors = 2", "")
    text = f"{table} = 3\n" + text + ('[data]\nmanifest = "m.json"\n' if table != "data" else "")
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=re.escape(f"{path}: '{table}' must be a table, not 3")):
        load_job_spec(path)


def test_good_values_load_ints_as_floats_and_verify(tmp_path: Path) -> None:
    spec = load_job_spec(write(tmp_path, GOOD))
    assert spec.data.verify is True
    assert isinstance(spec.resources.cpus_per_actor, float) and spec.resources.cpus_per_actor == 1.0
    text = set_key(set_key(set_key(set_key(GOOD, "data.verify", "false"), "resources.cpus_per_actor", "0.5"),
                           "resources.max_task_retries", "0"), "resources.max_actor_restarts", "0")
    spec = load_job_spec(write(tmp_path, text))
    assert spec.data.verify is False
    assert spec.resources.cpus_per_actor == 0.5
    assert (spec.resources.max_task_retries, spec.resources.max_actor_restarts) == (0, 0)


def test_dataclasses_built_in_code_are_checked_too() -> None:
    with pytest.raises(UserError, match=re.escape("job spec: 'resources.max_actors' must be an integer >= 1, not 1.5")):
        ResourceSpec(max_actors=1.5)  # type: ignore[arg-type]
    with pytest.raises(UserError, match=re.escape("job spec: 'data.verify' must be true or false, not 1")):
        DataSpec(manifest="m.json", verify=1)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="'batch_size' must be an integer >= 1"):
        JobSpec(name="t", output="o", variants=("a",), data=DataSpec(manifest="m.json"), batch_size=True)
    assert ResourceSpec(cpus_per_actor=2).cpus_per_actor == 2.0
    assert JobSpec(name="t", output="o", variants=["a"], data=DataSpec(shards=["x.tar"])).variants == ("a",)  # type: ignore[arg-type]


def test_spec_module_imports_neither_torch_nor_ray(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    code = (
        "import sys\n"
        "from vitlens.runner.spec import load_job_spec\n"
        f"load_job_spec({str(path)!r})\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
