"""The embedded demo jobs: the shapes set, the zoo models and their random twins, every
Section 5-8 experiment. `jobs/demo.toml` is the same job as a file (a test keeps them equal);
`jobs/demo_context0.toml` is the second, small job on uninformative context.

Three shard sets (all 20 classes x 10 images, 64 px, seed 0):
- `shards/`: validation, the harder setting (`difficulty = "hard"`: the zoo models misclassify
  15-30 % of it, so correct and misclassified images can be compared), context correlation 0.5;
- `shards-train/`: the train split in the same setting, the §8 probes' training images;
- `shards-context0/`: validation, standard difficulty, context correlation 0 (the background
  says nothing about the class): Fig. 3a's class- vs context-token comparison the other way.
"""

from __future__ import annotations

from pathlib import Path

from vitlens.runner.spec import EXPERIMENTS, DataSpec, ExplainSpec, JobSpec, ProbeSpec, ResourceSpec

DEMO_ZOO: tuple[str, ...] = (
    "shapes_vit_p16", "shapes_vit_p8", "shapes_vit_p8_deep", "shapes_vit_gap_p8", "shapes_vit_p16_objects",
)
DEMO_VARIANTS: tuple[str, ...] = DEMO_ZOO + tuple(f"{name}@random" for name in DEMO_ZOO)
#: The shapes sets of the demo: folder under OUT -> `vitlens shards shapes` settings.
DEMO_SHAPES: dict[str, dict[str, object]] = {
    "shards": {"classes": 20, "per_class": 10, "size": 64, "seed": 0, "split": "validation",
               "difficulty": "hard", "context_correlation": 0.5},
    "shards-train": {"classes": 20, "per_class": 10, "size": 64, "seed": 0, "split": "train",
                     "difficulty": "hard", "context_correlation": 0.5},
    "shards-context0": {"classes": 20, "per_class": 10, "size": 64, "seed": 0, "split": "validation",
                        "difficulty": "standard", "context_correlation": 0.0},
}
#: Training images per class of the demo's §8 probes (the paper's 10 shots).
DEMO_PROBE_SHOTS = 10
DEMO_BATCH_SIZE = 50
#: Deletion-curve points: 9 evenly spaced kept counts (every second one of the 16-token models;
#: every n of the 64-token models would make the demo several minutes longer on a laptop CPU).
DEMO_CURVE_POINTS = 9


def shapes_arguments(folder: str) -> list[str]:
    """The `vitlens shards shapes` options that write the demo's shard set `folder`."""
    settings = DEMO_SHAPES[folder]
    return ["--classes", str(settings["classes"]), "--per-class", str(settings["per_class"]),
            "--size", str(settings["size"]), "--seed", str(settings["seed"]), "--split", str(settings["split"]),
            "--difficulty", str(settings["difficulty"]),
            "--context-correlation", str(settings["context_correlation"])]


def demo_job(out_dir: str | Path, variants: tuple[str, ...] = DEMO_VARIANTS) -> JobSpec:
    """The demo's job spec writing under `out_dir` (shards in `shards/` and `shards-train/`,
    results in `results/`)."""
    out = Path(out_dir).resolve()
    return JobSpec(
        name="demo",
        output=str(out / "results"),
        variants=variants,
        data=DataSpec(manifest=str(out / "shards" / "manifest.json")),
        experiments=EXPERIMENTS,
        batch_size=DEMO_BATCH_SIZE,
        resources=ResourceSpec(device="auto", cpus_per_actor=1, max_actors=2),
        # beside the paper's gradients (method "ours"): the variant beyond the paper, final norm's
        # scale detached and the class logit as the target (method "ours[ln=frozen,loss=logit]")
        explain=ExplainSpec(curve_points=DEMO_CURVE_POINTS, ln="frozen", loss="logit"),
        probe=ProbeSpec(manifest=str(out / "shards-train" / "manifest.json"), shots=DEMO_PROBE_SHOTS),
    )


def context0_job(out_dir: str | Path, variants: tuple[str, ...] = DEMO_VARIANTS) -> JobSpec:
    """The demo's second job: the baseline lens on uninformative context (`shards-context0/`),
    into `results-context0/` (Fig. 3a the other way)."""
    out = Path(out_dir).resolve()
    return JobSpec(
        name="demo-context0",
        output=str(out / "results-context0"),
        variants=variants,
        data=DataSpec(manifest=str(out / "shards-context0" / "manifest.json")),
        experiments=("baseline",),
        batch_size=DEMO_BATCH_SIZE,
        resources=ResourceSpec(device="auto", cpus_per_actor=1, max_actors=2),
    )
