"""open_clip and transformers variants through `vitlens run`: one job, every experiment, the same
tables as a timm model, zero-shot heads from `vitlens heads zeroshot`, and the report.

One job on the shapes set (20 images) runs the embedded timm model beside a tiny open_clip CLIP
in open_clip's own folder layout (`local-dir:`, with its random twin), a transformers ViT
classifier and a transformers CLIP (both `save_pretrained` folders). Expectations come from
outside vitlens: row counts from the models' configs, the open_clip model's predictions from
open_clip's own `encode_image` and `build_zero_shot_classifier`, the table schemas from the
timm variant in the same job.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import duckdb
import pytest
import ray
import torch

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vitlens.cli import main as cli_main  # noqa: E402
from vitlens.report.build import build_report  # noqa: E402
from vitlens.runner.spec import load_job_spec  # noqa: E402
from vitlens.runner.variant_check import variant_problems  # noqa: E402

pytestmark = pytest.mark.slow

CLASSES = 20
EXPERIMENTS = ["baseline", "attn_self_only", "attn_no_cls", "remove_class_tokens", "remove_context_tokens",
               "explain", "probe"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "itap of a {}."]
TIMM = "shapes_vit_p16"
#: the tiny open_clip CLIP: 64-px input, 16-px patches (4 x 4 grid), 2 blocks
OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def write_open_clip_folder(folder: Path) -> None:
    """A tiny CLIP in open_clip's own hub layout: `open_clip_config.json` + weights."""
    torch.manual_seed(1)
    model = open_clip.model.CLIP(embed_dim=OPEN_CLIP_CONFIG["embed_dim"],
                                 vision_cfg=open_clip.model.CLIPVisionCfg(**OPEN_CLIP_CONFIG["vision_cfg"]),
                                 text_cfg=open_clip.model.CLIPTextCfg(**OPEN_CLIP_CONFIG["text_cfg"]))
    with torch.no_grad():  # a trained-looking tower: attention far from uniform
        for name, parameter in model.visual.named_parameters():
            if not name.startswith("ln"):
                parameter.normal_(0.0, 0.2)
    folder.mkdir()
    config = {"model_cfg": OPEN_CLIP_CONFIG, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))


def write_hf_vit_folder(folder: Path, class_names: list[str]) -> None:
    """A tiny transformers ViT classifier (32 px, 8-px patches, 2 layers) with its processor."""
    torch.manual_seed(2)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64,
                                    id2label=dict(enumerate(class_names)))
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


@pytest.fixture(scope="module")
def job_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shards, models, heads and one `vitlens run` of every experiment over every variant."""
    from tests.test_family_hf_clip import build as build_hf_contrastive

    root = tmp_path_factory.mktemp("library_job")
    for split, out in (("validation", "shards"), ("train", "train")):
        assert cli_main(["shards", "shapes", "--classes", str(CLASSES), "--per-class", "1", "--size", "64",
                         "--seed", "5", "--split", split, "--out", str(root / out), "--no-progress"]) == 0
    write_open_clip_folder(root / "open_clip_tiny")
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    write_hf_vit_folder(root / "hf_vit", manifest["class_names"])
    build_hf_contrastive("clip", root / "hf_clip")
    open_clip_name = f"open_clip:local-dir:{root / 'open_clip_tiny'}"
    variants = {"timm": TIMM, "open_clip": open_clip_name, "open_clip_random": open_clip_name + "@random",
                "hf_vit": f"hf:{root / 'hf_vit'}", "hf_clip": f"hf:{root / 'hf_clip'}"}
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    heads = {}
    for key in ("open_clip", "open_clip_random", "hf_clip"):
        heads[key] = root / f"{key}.safetensors"
        assert cli_main(["heads", "zeroshot", variants[key], "--classes", str(root / "shards" / "manifest.json"),
                         "--templates", str(root / "templates.txt"), "--out", str(heads[key]), "--no-progress"]) == 0
    head_lines = "".join(f'"{variants[key]}" = "{path.name}"\n' for key, path in heads.items())
    job = root / "job.toml"
    job.write_text(
        f'name = "library"\noutput = "results"\nvariants = {json.dumps(list(variants.values()))}\n'
        f"experiments = {json.dumps(EXPERIMENTS)}\nbatch_size = 10\n"
        f'data = {{ manifest = "shards/manifest.json" }}\n[heads]\n{head_lines}'
        f'[probe]\nmanifest = "train/manifest.json"\nshots = 1\n'
        f'[resources]\ndevice = "cpu"\nmax_actors = 2\n'
    )
    try:
        code = cli_main(["run", str(job), "--no-progress"])
    finally:
        ray.shutdown()
    return {"root": root, "code": code, "variants": variants, "heads": heads, "job": job,
            "results": root / "results", "manifest": manifest}


def table(results: Path, name: str, sql: str) -> list[tuple]:
    """`sql` with `T` = the rows of table `name`."""
    con = duckdb.connect()
    con.execute(f"CREATE VIEW T AS SELECT * FROM read_parquet('{results}/table={name}/**/*.parquet', "
                "hive_partitioning = true, union_by_name = true)")
    return con.execute(sql).fetchall()


def test_the_job_runs_every_experiment_on_every_variant(job_run) -> None:
    assert job_run["code"] == 0
    results, variants = job_run["results"], job_run["variants"]
    done = {(v, e) for v, e in table(results, "images", "SELECT DISTINCT variant, experiment FROM T")}
    for key, variant in variants.items():
        assert {e for v, e in done if v == variant} == set(EXPERIMENTS) - {"explain", "probe"}, key
    for name in ("explain", "probes"):  # their own tables
        assert {v for (v,) in table(results, name, "SELECT DISTINCT variant FROM T")} == set(variants.values())


def test_token_rows_follow_each_models_own_config(job_run) -> None:
    """images x (1 + blocks x 3 streams) x tokens from each library's config (2 blocks, 4 x 4 grid + CLS)."""
    results, variants = job_run["results"], job_run["variants"]
    counts = dict(table(results, "tokens", "SELECT variant, count(*) FROM T WHERE experiment = 'baseline' "
                                           "GROUP BY variant"))
    for key in ("open_clip", "open_clip_random", "hf_vit", "hf_clip"):
        assert counts[variants[key]] == CLASSES * (1 + 2 * 3) * (1 + 16), key  # block 0: resid only


def test_same_tables_and_columns_as_a_timm_model(job_run) -> None:
    results, variants = job_run["results"], job_run["variants"]
    for name in ("tokens", "images", "explain", "params", "perturbation_curves", "probes"):
        con = duckdb.connect()
        columns = {}
        for key, variant in variants.items():
            relation = con.execute(f"SELECT * FROM read_parquet('{results}/table={name}/**/*.parquet', "
                                   f"hive_partitioning = true, union_by_name = true) WHERE variant = ? LIMIT 1",
                                   [variant])
            columns[key] = ([d[0] for d in relation.description], relation.fetchall())
        assert all(found == columns["timm"][0] for found, _ in columns.values()), name
        assert all(found_rows for _, found_rows in columns.values()), name


def test_open_clip_predictions_are_open_clips_zero_shot(job_run) -> None:
    """The job's last-block prediction of every image equals open_clip's own zero-shot
    classification: its preprocess, `encode_image`, `build_zero_shot_classifier` with the same
    templates and the manifest's class names."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    root, variant = job_run["root"], job_run["variants"]["open_clip"]
    name = f"local-dir:{root / 'open_clip_tiny'}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    classifier = build_zero_shot_classifier(model, open_clip.get_tokenizer(name), job_run["manifest"]["class_names"],
                                            TEMPLATES, device="cpu", use_tqdm=False)  # [d', C]
    expected = {}
    for shard in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".image.png"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                    with torch.no_grad():
                        logits = model.encode_image(preprocess(image)[None], normalize=True) @ classifier
                    expected[member.name.split(".")[0]] = int(logits.argmax())
    found = dict(table(job_run["results"], "images", f"SELECT image_key, prediction FROM T WHERE variant = "
                                                     f"'{variant}' AND experiment = 'baseline'"))
    assert found == expected


def test_a_class_space_that_does_not_label_the_data_is_refused(job_run, tmp_path: Path) -> None:
    """A head built from other names (ImageNet's) on the shapes set: one line before any actor."""
    variant = job_run["variants"]["open_clip"]
    imagenet_head = tmp_path / "imagenet.safetensors"
    names = tmp_path / "names.txt"
    names.write_text("\n".join(reversed(job_run["manifest"]["class_names"])) + "\n")
    assert cli_main(["heads", "zeroshot", variant, "--classes", str(names), "--templates",
                     str(job_run["root"] / "templates.txt"), "--out", str(imagenet_head), "--no-progress"]) == 0
    spec = job_run["job"].read_text()
    spec = spec.replace(f'"{variant}" = "open_clip.safetensors"', f'"{variant}" = "{imagenet_head}"')
    (job_run["root"] / "job_wrong_names.toml").write_text(spec)
    problems = variant_problems(load_job_spec(job_run["root"] / "job_wrong_names.toml"))
    assert len(problems) == 1 and "first difference at index 0" in problems[0] and variant in problems[0]


def test_the_report_covers_the_library_variants(job_run, tmp_path: Path) -> None:
    out = build_report(job_run["results"], tmp_path / "report", progress=False)
    table1 = (tmp_path / "report" / "tables").glob("table1*.csv")
    text = "".join(path.read_text() for path in table1)
    for variant in job_run["variants"].values():
        assert variant in text
    assert out is not None
