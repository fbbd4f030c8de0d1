"""The embedded demo job: the shapes set, the zoo models and their random twins, every
Section 5-7 experiment. `jobs/demo.toml` is the same job as a file (a test keeps them equal).
"""

from __future__ import annotations

from pathlib import Path

from vitlens.runner.spec import EXPERIMENTS, DataSpec, ExplainSpec, JobSpec, ResourceSpec

DEMO_ZOO: tuple[str, ...] = (
    "shapes_vit_p16", "shapes_vit_p8", "shapes_vit_p8_deep", "shapes_vit_gap_p8", "shapes_vit_p16_objects",
)
DEMO_VARIANTS: tuple[str, ...] = DEMO_ZOO + tuple(f"{name}@random" for name in DEMO_ZOO)
#: The shapes set the demo analyses: (classes, images per class, size, seed).
DEMO_SHAPES = {"classes": 20, "per_class": 10, "size": 64, "seed": 0}
DEMO_BATCH_SIZE = 50
#: Deletion-curve points: 9 evenly spaced kept counts (every second one of the 16-token models;
#: every n of the 64-token models would make the demo several minutes longer on a laptop CPU).
DEMO_CURVE_POINTS = 9


def demo_job(out_dir: str | Path, variants: tuple[str, ...] = DEMO_VARIANTS) -> JobSpec:
    """The demo's job spec writing under `out_dir` (shards in `shards/`, results in `results/`)."""
    out = Path(out_dir).resolve()
    return JobSpec(
        name="demo",
        output=str(out / "results"),
        variants=variants,
        data=DataSpec(manifest=str(out / "shards" / "manifest.json")),
        experiments=EXPERIMENTS,
        batch_size=DEMO_BATCH_SIZE,
        resources=ResourceSpec(device="auto", cpus_per_actor=1, max_actors=2),
        explain=ExplainSpec(curve_points=DEMO_CURVE_POINTS),
    )
