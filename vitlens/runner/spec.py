"""The job spec: a TOML file validated into a frozen dataclass (errors name the key).

A job spec says what to analyse (shards), with which models (variants), under which
experiments, and where the Parquet store goes. The same dataclass drives the CLI
(`vitlens run JOB`) and programmatic use (`run_job(JobSpec(...))`).

Example (`jobs/demo.toml`)::

    name = "demo"
    output = "demo-out/results"        # relative paths resolve against the spec's folder
    batch_size = 32
    detail = "tokens"                  # tokens: a row per token | summary: only the sums the paper's tables need
    variants = ["shapes_vit_p16", "shapes_vit_p16@random"]
    experiments = ["baseline", "attn_self_only", "attn_no_cls",
                   "remove_class_tokens", "remove_context_tokens"]

    [data]
    manifest = "demo-out/shards/manifest.json"   # or: shards = ["a.tar", "https://.../b.tar"]
    verify = true            # check every shard's sha256 against the manifest (false: skip)
    transform = "timm"       # timm: exact eval transform on the host | device: on the actor's device

    [checkpoints]            # local weight files for variants that need one
    vit_cifar100 = "/models/vit_b16_cifar100.pth"

    [heads]                  # linear-head files (weight [C, d], bias [C]) for headless models
    vit_small_patch14_dinov2 = "/models/dinov2_s14_in1k_head.pth"   # (each table names listed variants)

    [models."vit_small_patch14_dinov2@random"]   # timm kwargs of one variant (scalars)
    num_classes = 1000       # a headless model's random twin needs its classes
    img_size = 224

    [resources]
    device = "auto"          # auto | cpu | cuda
    cpus_per_actor = 1
    max_actors = 2           # CPU actors when no GPU; with GPUs: one actor per (variant, GPU)
    max_task_retries = 2     # retries of a shard whose analysis failed or whose actor died
    max_actor_restarts = 2   # passed to Ray; the driver also replaces a dead actor itself
    precision = "fp32"       # the forward: fp32 | tf32 | bf16 (ranks and top-k from fp32 logits)
    projections = "fp32"     # fp32 | fast (bf16 logits, near ties in fp32: the same results bit for bit)
    decode_workers = 2       # DataLoader decode processes per actor (default: cpus_per_actor - 1)

    [explain]                # settings of the "explain" experiment (paper §7), all optional
    target = "true"          # class of interest: true | predicted
    source = "resid"         # CLS of the residual stream (paper) | attn (the reference code)
    curve_points = 0         # kept counts per deletion curve: 0 = every n = 0..N, else K evenly spaced

Every key of every table is checked against one description (`KEYS`: what it must be and
how it converts), both when a file is loaded and when the dataclasses are built in code;
a mistake is one `UserError` line naming the file and key, e.g.
``job.toml: 'resources.max_actors' must be an integer >= 1, not 1.5``. Booleans are not
numbers, integers are accepted where a float is. This module imports neither torch,
timm nor ray: a spec is checked before any of them loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from vitlens.errors import UserError
from vitlens.store.storage import normalise_root
from vitlens.settings import DETAILS, EXPLAIN_LN, EXPLAIN_LOSSES, PRECISIONS, PROBE_STREAMS, PROJECTIONS, TRANSFORMS
from vitlens.runner.spec_keys import FLAG, TEXT, TEXTS, Key, checked, integer, is_int, one_of, positive_number
from vitlens.toml_files import read_toml, toml_value

#: Every experiment a job can run; "baseline" is the unperturbed model.
EXPERIMENTS: tuple[str, ...] = (
    "baseline",
    "attn_self_only",
    "attn_no_cls",
    "remove_class_tokens",
    "remove_context_tokens",
    "explain",
    "probe",
    "heads",
    "tuned",
)
#: The experiments trained on the [probe] training shards (METHOD §7, §7b).
TRAINED_EXPERIMENTS: tuple[str, ...] = ("probe", "tuned")
EXPLAIN_TARGETS: tuple[str, ...] = ("true", "predicted")
EXPLAIN_SOURCES: tuple[str, ...] = ("resid", "attn")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: Where messages about a spec built in code (not read from a file) say the mistake is.
IN_CODE = "job spec"


STREAMS_KEY = Key(f"a non-empty list of distinct streams from {list(PROBE_STREAMS)}",
                  lambda v: isinstance(v, (list, tuple)) and 0 < len(v) == len(set(v))
                  and all(s in PROBE_STREAMS for s in v),
                  lambda v: tuple(s for s in PROBE_STREAMS if s in v))
CURVE_POINTS = Key("0 (every kept count) or an integer >= 2", lambda v: is_int(v) and (v == 0 or v >= 2))

#: Every key of every table: "" is the top level; [checkpoints] and [heads] map variants to
#: files (`TEXT`), [models.NAME] holds one variant's timm kwargs (`MODEL_KWARGS`).
KEYS: dict[str, dict[str, Key]] = {
    "": {
        "name": TEXT,
        "output": TEXT,
        "variants": TEXTS,
        "experiments": TEXTS,
        "batch_size": integer(1),
        "detail": one_of(DETAILS),
    },
    "data": {"manifest": TEXT, "shards": TEXTS, "verify": FLAG, "transform": one_of(TRANSFORMS)},
    "resources": {
        "device": one_of(DEVICES),
        "cpus_per_actor": positive_number(),
        "max_actors": integer(1),
        "max_task_retries": integer(0),
        "max_actor_restarts": integer(0),
        "precision": one_of(PRECISIONS),
        "projections": one_of(PROJECTIONS),
        "decode_workers": integer(0),
    },
    "explain": {"target": one_of(EXPLAIN_TARGETS), "source": one_of(EXPLAIN_SOURCES), "curve_points": CURVE_POINTS,
                "ln": one_of(EXPLAIN_LN), "loss": one_of(EXPLAIN_LOSSES), "random_orders": integer(1)},
    "probe": {"manifest": TEXT, "shards": TEXTS, "verify": FLAG, "shots": integer(1), "alpha": positive_number(),
              "streams": STREAMS_KEY},
}
CHECKPOINT_FILE = TEXT
HEAD_FILE = TEXT
#: [models.NAME]: any timm kwarg as a scalar; these few are checked further (or refused).
MODEL_KWARG = Key("a number, string or boolean (a timm keyword argument)",
                  lambda v: isinstance(v, (bool, int, float, str)))
MODEL_KWARGS: dict[str, Key] = {
    "num_classes": integer(1),
    "pretrained": Key("left out: the variant's weights source (hub, checkpoint, @random) decides it",
                      lambda v: False),
}
#: The tables of a job spec, each with the keys it allows (None: any key, here variants).
TABLES: dict[str, set[str] | None] = {
    "data": set(KEYS["data"]), "resources": set(KEYS["resources"]), "explain": set(KEYS["explain"]),
    "probe": set(KEYS["probe"]),
    "checkpoints": None, "heads": None, "models": None,
}


def _name(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


def _check_fields(spec: Any, table: str) -> None:
    """Check and convert every field of the frozen dataclass `spec` (the [`table`] keys);
    a field left at its default is valid by construction."""
    for f in fields(spec):
        if f.name not in KEYS[table]:
            continue
        value = getattr(spec, f.name)
        if value is f.default or (type(value) is type(f.default) and value == f.default):
            continue
        object.__setattr__(spec, f.name, checked(KEYS[table][f.name], value, _name(table, f.name), IN_CODE))


@dataclass(frozen=True)
class DataSpec:
    """Where the samples come from: a shard manifest or an explicit list of shard URLs."""

    manifest: str | None = None
    shards: tuple[str, ...] = ()
    verify: bool = True  # check each shard's sha256 against the manifest before reading it
    transform: str = "timm"  # resize/crop/normalise: timm (host, exact) | device (actor's device, nvJPEG on CUDA)

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        if (self.manifest is None) == (not self.shards):
            raise UserError(f"{IN_CODE}: [data] needs exactly one of 'manifest' or 'shards'")


@dataclass(frozen=True)
class ResourceSpec:
    """How actors are placed: one per (variant, GPU), or CPU actors with explicit CPUs."""

    device: str = "auto"
    cpus_per_actor: float = 1.0
    max_actors: int = 2
    max_task_retries: int = 2
    max_actor_restarts: int = 2
    precision: str = "fp32"  # the forward's arithmetic: fp32 | tf32 | bf16 (ranks from fp32 logits)
    projections: str = "fp32"  # the projections: fp32 | fast (vitlens.lens.projection; same results)
    decode_workers: int = -1  # DataLoader decode processes per actor; -1: cpus_per_actor - 1

    def __post_init__(self) -> None:
        _check_fields(self, "resources")

    @property
    def workers(self) -> int:
        """The decode workers an actor starts: `decode_workers`, or one per CPU beyond the first."""
        return self.decode_workers if self.decode_workers >= 0 else max(0, int(self.cpus_per_actor) - 1)


@dataclass(frozen=True)
class ExplainSpec:
    """Settings of the `explain` experiment (METHOD §6)."""

    target: str = "true"  # class of interest: the label or the model's prediction
    source: str = "resid"  # CLS token of the residual stream after block b, or of the attention output
    curve_points: int = 0  # kept counts per deletion curve: 0 = all n = 0..N
    # Beyond the paper (never the default): with ln = "frozen" or loss = "logit" the job also
    # computes the paper's gradients with the final norm's scale detached / the class logit as
    # the target, as method "ours[ln=frozen,loss=logit]" beside "ours".
    ln: str = "live"
    loss: str = "ce"
    random_orders: int = 10  # method "random" = the mean over this many random orders (METHOD §6: >= 10)

    def __post_init__(self) -> None:
        _check_fields(self, "explain")


@dataclass(frozen=True)
class ProbeSpec:
    """Settings of the `probe` experiment (paper §8, METHOD §7): the training shards (disjoint
    from the analysed ones), shots per class, the ridge penalty and the streams probed."""

    manifest: str | None = None
    shards: tuple[str, ...] = ()
    verify: bool = True  # check each training shard's sha256 against its manifest
    shots: int = 10  # training images per class (the first `shots` of each class, in shard order)
    alpha: float = 1.0  # ridge penalty (scikit-learn Ridge(alpha) with an intercept)
    streams: tuple[str, ...] = PROBE_STREAMS

    def __post_init__(self) -> None:
        _check_fields(self, "probe")

    @property
    def data(self) -> DataSpec | None:
        """The training shards as a `DataSpec` (None when the spec names none)."""
        if self.manifest is None and not self.shards:
            return None
        return DataSpec(manifest=self.manifest, shards=self.shards, verify=self.verify)


@dataclass(frozen=True)
class JobSpec:
    """A whole analysis job; see the module docstring for the TOML form."""

    name: str
    output: str
    variants: tuple[str, ...]
    data: DataSpec
    experiments: tuple[str, ...] = ("baseline",)
    batch_size: int = 32
    detail: str = "tokens"  # tokens: every token's row | summary: the sums every paper table needs
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    explain: ExplainSpec = field(default_factory=ExplainSpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    checkpoints: tuple[tuple[str, str], ...] = ()  # (variant, local weight file) pairs
    heads: tuple[tuple[str, str], ...] = ()  # (variant, linear-head file) pairs
    models: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # (variant, ((kwarg, value), ...))

    def checkpoint_for(self, variant: str) -> str | None:
        """The weight file the spec names for `variant` (its random twin never takes one)."""
        return dict(self.checkpoints).get(variant)

    def head_for(self, variant: str) -> str | None:
        """The linear-head file the spec names for `variant` ([heads]), or None."""
        return dict(self.heads).get(variant)

    def model_kwargs_for(self, variant: str) -> dict[str, Any]:
        """The timm kwargs the spec gives `variant` ([models.NAME]; empty when none)."""
        return dict(dict(self.models).get(variant, ()))

    def __post_init__(self) -> None:
        _check_fields(self, "")
        for name, table in (("data", DataSpec), ("resources", ResourceSpec), ("explain", ExplainSpec),
                            ("probe", ProbeSpec)):
            value = getattr(self, name)
            if not isinstance(value, table):
                raise UserError(f"{IN_CODE}: '{name}' must be a {table.__name__}, not {type(value).__name__}")
        object.__setattr__(self, "checkpoints", tuple(tuple(pair) for pair in self.checkpoints))
        object.__setattr__(self, "heads", tuple(tuple(pair) for pair in self.heads))
        models = dict(self.models)
        _check_relations(self.variants, self.experiments, dict(self.checkpoints), IN_CODE,
                         dict(self.heads), models)
        object.__setattr__(self, "models", _frozen_models(models))
        _check_probe(self.experiments, self.probe, IN_CODE)


def _check_probe(experiments: tuple[str, ...], probe: "ProbeSpec", source: str) -> None:
    """The `probe` and `tuned` experiments need [probe] training shards; [probe] shards need one of them."""
    if probe.manifest is not None and probe.shards:
        raise UserError(f"{source}: [probe] needs exactly one of 'manifest' or 'shards'")
    trained = [e for e in TRAINED_EXPERIMENTS if e in experiments]
    if trained and probe.data is None:
        raise UserError(f"{source}: experiment '{trained[0]}' needs its training shards: [probe] manifest = ... "
                        "or shards = [...] (disjoint from [data])")
    if not trained and probe.data is not None:
        raise UserError(f"{source}: [probe] names training shards but 'experiments' has neither 'probe' nor 'tuned'")


def _frozen_models(models: Mapping[str, Any]) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """[models] as sorted (variant, sorted (kwarg, value) pairs) tuples (hashable, JSON-able)."""
    return tuple((variant, tuple(sorted(dict(kwargs).items()))) for variant, kwargs in sorted(models.items()))


def _check_relations(variants: tuple[str, ...], experiments: tuple[str, ...], checkpoints: Mapping[str, Any],
                     source: str, heads: Mapping[str, Any] | None = None,
                     models: Mapping[str, Any] | None = None) -> None:
    """The checks that span keys: no variant twice, known experiments, checkpoint and head
    files that are strings, [models.NAME] tables of scalar timm kwargs, each belonging to a
    listed variant."""
    if len(set(variants)) != len(variants):
        raise UserError(f"{source}: 'variants' lists a variant twice")
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown:
        raise UserError(f"{source}: 'experiments' has unknown {unknown}; choose from {list(EXPERIMENTS)}")
    for table, files, key in (("checkpoints", checkpoints, CHECKPOINT_FILE), ("heads", heads or {}, HEAD_FILE)):
        for variant, file in files.items():
            checked(key, file, f"{table}.{variant}", source)
            if variant not in variants:
                raise UserError(f"{source}: '{table}.{variant}' names a variant that is not in 'variants'")
    for variant, kwargs in (models or {}).items():
        if isinstance(kwargs, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in kwargs):
            kwargs = dict(kwargs)  # the frozen form, ((kwarg, value), ...), of a spec built in code
        if not isinstance(kwargs, Mapping):
            raise UserError(f"{source}: 'models.{variant}' must be a table of timm keyword arguments, "
                            f"not {toml_value(kwargs)}")
        if variant not in variants:
            raise UserError(f"{source}: 'models.{variant}' names a variant that is not in 'variants'")
        for name, value in kwargs.items():
            key = MODEL_KWARGS.get(name, MODEL_KWARG)
            checked(key, value, f"models.{variant}.{name}", source)


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str, path: Path) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise UserError(f"{path}: unknown key(s) {extra} in {where}; allowed: {sorted(allowed)}")


def _check_table(raw: Mapping[str, Any], table: str, path: Path) -> dict[str, Any]:
    """The [`table`] of `raw` (empty when absent) with its keys checked and converted."""
    if table not in raw:
        return {}
    value = raw[table]
    if not isinstance(value, dict):
        raise UserError(f"{path}: '{table}' must be a table, not {toml_value(value)}")
    allowed = TABLES[table]
    if allowed is None:
        return dict(value)
    _check_keys(value, allowed, f"[{table}]", path)
    return {k: checked(KEYS[table][k], v, _name(table, k), str(path)) for k, v in value.items()}


def _resolve(base: Path, value: str) -> str:
    """Resolve a relative local path against the spec's folder; URLs pass unchanged."""
    if "://" in value or value.startswith(("pipe:", "/")):
        return value
    return str((base / value).resolve())


def load_job_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> JobSpec:
    """Read and validate a TOML job spec; relative paths resolve against its folder.

    Every key is checked here, so a mistake names the file; `overrides` (e.g. the CLI's
    `--output`) replace top-level keys before the checks.
    """
    path = Path(path)
    raw = read_toml(path, "job spec", overrides)
    _check_keys(raw, set(KEYS[""]) | set(TABLES), "the top level", path)
    for key in ("name", "output", "variants", "data"):
        if key not in raw:
            raise UserError(f"{path}: missing required key '{key}'")
    top = {k: checked(KEYS[""][k], v, k, str(path)) for k, v in raw.items() if k in KEYS[""]}
    base = path.parent
    top["output"] = normalise_root(top["output"], base)  # a local folder, or an object-store URL
    data_raw = _check_table(raw, "data", path)
    if ("manifest" in data_raw) == ("shards" in data_raw):
        raise UserError(f"{path}: [data] needs exactly one of 'manifest' or 'shards'")
    if "manifest" in data_raw:
        data_raw["manifest"] = _resolve(base, data_raw["manifest"])
    if "shards" in data_raw:
        data_raw["shards"] = tuple(_resolve(base, s) for s in data_raw["shards"])
    ckpt_raw = _check_table(raw, "checkpoints", path)
    heads_raw = _check_table(raw, "heads", path)
    models_raw = _check_table(raw, "models", path)
    experiments = top.get("experiments", JobSpec.__dataclass_fields__["experiments"].default)
    _check_relations(top["variants"], experiments, ckpt_raw, str(path), heads_raw, models_raw)
    probe_raw = _check_table(raw, "probe", path)
    for key in ("manifest",):
        if key in probe_raw:
            probe_raw[key] = _resolve(base, probe_raw[key])
    if "shards" in probe_raw:
        probe_raw["shards"] = tuple(_resolve(base, s) for s in probe_raw["shards"])
    probe = ProbeSpec(**probe_raw)
    _check_probe(experiments, probe, str(path))
    return JobSpec(
        **top,
        probe=probe,
        data=DataSpec(**data_raw),
        resources=ResourceSpec(**_check_table(raw, "resources", path)),
        explain=ExplainSpec(**_check_table(raw, "explain", path)),
        checkpoints=tuple((v, _resolve(base, f)) for v, f in sorted(ckpt_raw.items())),
        heads=tuple((v, _resolve(base, f)) for v, f in sorted(heads_raw.items())),
        models=_frozen_models(models_raw),
    )
