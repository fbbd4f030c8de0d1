"""The check of a job's variants before any actor starts: known names, weight files named,
head files that fit, and an architecture the lens analyses exactly, built on the meta device
(no weights; a head file's tensor shapes are read).

The driver runs `variant_problems` as one Ray task (so the driver process itself never
imports torch); the function imports the model code only when it runs.
"""

from __future__ import annotations

from vitlens.errors import UserError, one_line_reason
from vitlens.runner.spec import JobSpec


def variant_problems(job: JobSpec) -> list[str]:
    """One line per variant of `job` that cannot run (empty when all can), in spec order.

    Each variant is built as its actor will build it: with its `[checkpoints]` file, its
    `[heads]` file and its `[models.NAME]` timm kwargs. A headless model (`num_classes=0`)
    with neither a head file nor `num_classes` is refused here, naming the variant, and so is a
    head file whose recorded class names (zero-shot heads) do not label the job's data.
    """
    from vitlens.lens.anatomy import describe_model
    from vitlens.models.registry import build_architecture, get_variant, with_options

    problems = []
    for variant in job.variants:
        try:
            spec = get_variant(variant)
            if spec.weights == "checkpoint" and job.checkpoint_for(variant) is None:
                raise UserError(f"variant {variant!r} needs a weight file: add it under [checkpoints] in the job spec")
            try:
                spec = with_options(spec, job.checkpoint_for(variant), job.head_for(variant),
                                    job.model_kwargs_for(variant))
                describe_model(build_architecture(spec))
                mismatch = _class_space_mismatch(job, spec.head_path)
                if mismatch:
                    raise UserError(f"variant {variant!r}: {mismatch}")
            except UserError as err:
                message = str(err)
                raise UserError(message if repr(variant) in message else f"variant {variant!r}: {message}") from None
        except UserError as err:
            problems.append(one_line_reason(str(err)))
        except Exception as err:  # a model timm cannot even build on the meta device
            problems.append(f"variant {variant!r} cannot be built: {one_line_reason(err)}")
    return problems


def _class_space_mismatch(job: JobSpec, head_path: str | None) -> str | None:
    """Why the class names a head file records cannot label the job's data (None when they can,
    or when the head records none, or the data has no local manifest to compare with)."""
    from vitlens.data.manifest import is_local, local_path, read_manifest
    from vitlens.models.zeroshot import class_space_mismatch, head_file_classes

    if head_path is None or job.data.manifest is None or not is_local(job.data.manifest):
        return None
    classes = head_file_classes(head_path)
    if classes is None:
        return None
    mismatch = class_space_mismatch(classes, read_manifest(local_path(job.data.manifest)))
    return None if mismatch is None else f"head file {head_path}: {mismatch}"
