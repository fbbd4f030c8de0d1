"""The job spec: a TOML file validated into a frozen dataclass (errors name the key).

A job spec says what to analyse (shards), with which models (variants), under which
experiments, and where the Parquet store goes. The same dataclass drives the CLI
(`vitlens run JOB`) and programmatic use (`run_job(JobSpec(...))`).

Example (`jobs/demo.toml`)::

    name = "demo"
    output = "demo-out/results"        # relative paths resolve against the spec's folder
    batch_size = 32
    variants = ["shapes_vit_p16", "shapes_vit_p16@random"]
    experiments = ["baseline", "attn_self_only", "attn_no_cls",
                   "remove_class_tokens", "remove_context_tokens"]

    [data]
    manifest = "demo-out/shards/manifest.json"   # or: shards = ["a.tar", "https://.../b.tar"]

    [checkpoints]            # local weight files for variants that need one
    vit_cifar100 = "/models/vit_b16_cifar100.pth"

    [resources]
    device = "auto"          # auto | cpu | cuda
    cpus_per_actor = 1
    max_actors = 2           # CPU actors when no GPU; with GPUs: one actor per (variant, GPU)

    [explain]                # settings of the "explain" experiment (paper §7), all optional
    target = "true"          # class of interest: true | predicted
    source = "resid"         # CLS of the residual stream (paper) | attn (the reference code)
    curve_points = 0         # kept counts per deletion curve: 0 = every n = 0..N, else K evenly spaced
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from vitlens.errors import UserError
from vitlens.toml_files import read_toml

#: Every experiment a job can run; "baseline" is the unperturbed model.
EXPERIMENTS: tuple[str, ...] = (
    "baseline",
    "attn_self_only",
    "attn_no_cls",
    "remove_class_tokens",
    "remove_context_tokens",
    "explain",
)
EXPLAIN_TARGETS: tuple[str, ...] = ("true", "predicted")
EXPLAIN_SOURCES: tuple[str, ...] = ("resid", "attn")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DataSpec:
    """Where the samples come from: a shard manifest or an explicit list of shard URLs."""

    manifest: str | None = None
    shards: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResourceSpec:
    """How actors are placed: one per (variant, GPU), or CPU actors with explicit CPUs."""

    device: str = "auto"
    cpus_per_actor: float = 1.0
    max_actors: int = 2
    max_task_retries: int = 2
    max_actor_restarts: int = 2


@dataclass(frozen=True)
class ExplainSpec:
    """Settings of the `explain` experiment (METHOD §6)."""

    target: str = "true"  # class of interest: the label or the model's prediction
    source: str = "resid"  # CLS token of the residual stream after block b, or of the attention output
    curve_points: int = 0  # kept counts per deletion curve: 0 = all n = 0..N

    def __post_init__(self) -> None:
        if self.target not in EXPLAIN_TARGETS:
            raise UserError(f"job spec: 'explain.target' must be one of {list(EXPLAIN_TARGETS)}")
        if self.source not in EXPLAIN_SOURCES:
            raise UserError(f"job spec: 'explain.source' must be one of {list(EXPLAIN_SOURCES)}")
        if self.curve_points < 0 or self.curve_points == 1:
            raise UserError("job spec: 'explain.curve_points' must be 0 (every kept count) or >= 2")


@dataclass(frozen=True)
class JobSpec:
    """A whole analysis job; see the module docstring for the TOML form."""

    name: str
    output: str
    variants: tuple[str, ...]
    data: DataSpec
    experiments: tuple[str, ...] = ("baseline",)
    batch_size: int = 32
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    explain: ExplainSpec = field(default_factory=ExplainSpec)
    checkpoints: tuple[tuple[str, str], ...] = ()  # (variant, local weight file) pairs

    def checkpoint_for(self, variant: str) -> str | None:
        """The weight file the spec names for `variant` (its random twin never takes one)."""
        return dict(self.checkpoints).get(variant)

    def __post_init__(self) -> None:
        if not self.name:
            raise UserError("job spec: 'name' must not be empty")
        if not self.variants:
            raise UserError("job spec: 'variants' must list at least one variant")
        if len(set(self.variants)) != len(self.variants):
            raise UserError("job spec: 'variants' lists a variant twice")
        unknown = [e for e in self.experiments if e not in EXPERIMENTS]
        if unknown:
            raise UserError(
                f"job spec: 'experiments' has unknown {unknown}; choose from {list(EXPERIMENTS)}"
            )
        if not self.experiments:
            raise UserError("job spec: 'experiments' must list at least one experiment")
        if self.batch_size < 1:
            raise UserError("job spec: 'batch_size' must be >= 1")
        if (self.data.manifest is None) == (not self.data.shards):
            raise UserError("job spec: [data] needs exactly one of 'manifest' or 'shards'")
        if self.resources.device not in DEVICES:
            raise UserError(f"job spec: 'resources.device' must be one of {list(DEVICES)}")
        if self.resources.cpus_per_actor <= 0 or self.resources.max_actors < 1:
            raise UserError("job spec: 'resources.cpus_per_actor' > 0 and 'max_actors' >= 1 required")


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str, path: Path) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise UserError(f"{path}: unknown key(s) {extra} in {where}; allowed: {sorted(allowed)}")


def _typed(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, path: Path) -> Any:
    value = table[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise UserError(f"{path}: '{where}{key}' must be a number, not {value!r}")
    if not isinstance(value, kind):
        raise UserError(f"{path}: '{where}{key}' has the wrong type ({type(value).__name__})")
    return value


def _resolve(base: Path, value: str) -> str:
    """Resolve a relative local path against the spec's folder; URLs pass unchanged."""
    if "://" in value or value.startswith(("pipe:", "/")):
        return value
    return str((base / value).resolve())


def load_job_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> JobSpec:
    """Read and validate a TOML job spec; relative paths resolve against its folder."""
    path = Path(path)
    raw = read_toml(path, "job spec", overrides)
    top = {f.name for f in fields(JobSpec)}
    _check_keys(raw, top, "the top level", path)
    for key in ("name", "output", "variants", "data"):
        if key not in raw:
            raise UserError(f"{path}: missing required key '{key}'")
    base = path.parent
    data_raw = _typed(raw, "data", dict, "", path)
    _check_keys(data_raw, {"manifest", "shards"}, "[data]", path)
    data = DataSpec(
        manifest=_resolve(base, _typed(data_raw, "manifest", str, "data.", path)) if "manifest" in data_raw else None,
        shards=tuple(_resolve(base, s) for s in _typed(data_raw, "shards", list, "data.", path)) if "shards" in data_raw else (),
    )
    res_raw = _typed(raw, "resources", dict, "", path) if "resources" in raw else {}
    _check_keys(res_raw, {f.name for f in fields(ResourceSpec)}, "[resources]", path)
    resources = ResourceSpec(**res_raw)
    explain_raw = _typed(raw, "explain", dict, "", path) if "explain" in raw else {}
    _check_keys(explain_raw, {f.name for f in fields(ExplainSpec)}, "[explain]", path)
    for key, kind in (("target", str), ("source", str), ("curve_points", int)):
        if key in explain_raw:
            _typed(explain_raw, key, kind, "explain.", path)
    explain = ExplainSpec(**explain_raw)
    variants = _typed(raw, "variants", list, "", path)
    experiments = _typed(raw, "experiments", list, "", path) if "experiments" in raw else ["baseline"]
    ckpt_raw = _typed(raw, "checkpoints", dict, "", path) if "checkpoints" in raw else {}
    for variant, file in ckpt_raw.items():
        if variant not in variants:
            raise UserError(f"{path}: 'checkpoints.{variant}' names a variant that is not in 'variants'")
        if not isinstance(file, str):
            raise UserError(f"{path}: 'checkpoints.{variant}' must be a file path")
    return JobSpec(
        name=_typed(raw, "name", str, "", path),
        output=_resolve(base, _typed(raw, "output", str, "", path)),
        variants=tuple(str(v) for v in variants),
        data=data,
        experiments=tuple(str(e) for e in experiments),
        batch_size=_typed(raw, "batch_size", int, "", path) if "batch_size" in raw else 32,
        resources=resources,
        explain=explain,
        checkpoints=tuple((v, _resolve(base, f)) for v, f in sorted(ckpt_raw.items())),
    )
