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
    with neither a head file nor `num_classes` is refused here, naming the variant.
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
            except UserError as err:
                message = str(err)
                raise UserError(message if repr(variant) in message else f"variant {variant!r}: {message}") from None
        except UserError as err:
            problems.append(one_line_reason(str(err)))
        except Exception as err:  # a model timm cannot even build on the meta device
            problems.append(f"variant {variant!r} cannot be built: {one_line_reason(err)}")
    return problems
