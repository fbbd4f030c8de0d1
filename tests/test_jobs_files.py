"""The job files in jobs/ load, name registered variants, and the demo file is the demo job."""

from pathlib import Path

from vitlens.models.registry import get_variant
from vitlens.runner.demo import context0_job, demo_job
from vitlens.runner.spec import EXPERIMENTS, load_job_spec

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_demo_file_is_the_demo_job() -> None:
    from_file = load_job_spec(JOBS / "demo.toml")
    in_code = demo_job(JOBS.parent / "demo-out")
    assert from_file == in_code
    assert load_job_spec(JOBS / "demo_context0.toml") == context0_job(JOBS.parent / "demo-out")


def test_paper_job_names_the_seven_variants_and_their_twins() -> None:
    spec = load_job_spec(JOBS / "paper.toml")
    roles = {get_variant(v).role for v in spec.variants if not v.endswith("@random")}
    assert roles == {"B/32", "B/16", "L/16", "MIIL", "GAP", "CIFAR-100", "Refinement"}
    assert all(get_variant(v) for v in spec.variants)
    assert spec.experiments == EXPERIMENTS
    assert dict(spec.checkpoints).keys() == {"vit_cifar100", "deit_refinement"}
    assert spec.resources.device == "cuda"
