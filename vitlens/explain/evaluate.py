"""Every explanation method on one batch, and the deletion tests comparing them.

`explain_batch` is what the job's `explain` experiment runs per batch: the paper's
block × head gradients, every baseline, and both deletion tests of every method's global
map (METHOD §6), all on the same images.

Beyond the paper (never the default): with `ln="frozen"` and / or `loss="logit"`
(`vitlens.explain.gradients`) the batch ALSO gets that variant of the gradients as a method of
its own, `ours_method_name(ln, loss)` (e.g. `ours[ln=frozen,loss=logit]`), kept like a
baseline (its global map and both deletion curves); `ours` is always the paper's method.

The random baseline is the mean over `random_orders` seeded random orders (METHOD §6: at
least 10). A random order's negative and positive tests are the same distribution (keeping
the "most" or the "least" important first of a uniformly random permutation is again a
uniformly random order), so each order's curve is computed ONCE and stored for both tests
(`PerturbationCurve.order` numbers them 0..R−1; the other methods have order 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vitlens.explain.baselines import baseline_importances, random_orders as draw_random_orders
from vitlens.explain.deletion import (
    DELETION_TESTS,
    curve_auc,
    deletion_predictions,
    kept_token_counts,
    reference_normalised_auc,
)
from vitlens.explain.gradients import (
    GradientLoss,
    GradientSource,
    NormScale,
    block_head_importance,
    check_explain_options,
    global_importance,
)

#: The fixed methods of every `explain` batch (a beyond-paper variant adds `ours_method_name`).
METHODS: tuple[str, ...] = ("ours", "chefer", "attention", "rollout", "random")
#: The random baseline's method name (its curves carry `order` 0..R-1).
RANDOM_METHOD = "random"


def ours_method_name(ln: NormScale = "live", loss: GradientLoss = "ce") -> str:
    """The method name of the paper's gradients with these options: `ours` for the paper's
    own (ln="live", loss="ce"), else `ours[...]` naming only the non-default parts, e.g.
    `ours[ln=frozen]`, `ours[loss=logit]`, `ours[ln=frozen,loss=logit]`.
    """
    check_explain_options("resid", ln, loss)
    parts = [f"ln={ln}"] if ln != "live" else []
    parts += [f"loss={loss}"] if loss != "ce" else []
    return f"ours[{','.join(parts)}]" if parts else "ours"


def method_importances(
    model: torch.nn.Module,
    images: torch.Tensor,
    class_index: torch.Tensor,
    source: GradientSource = "resid",
    seed: int = 0,
    ln: NormScale = "live",
    loss: GradientLoss = "ce",
) -> dict[str, torch.Tensor]:
    """Global token importance of every method in `METHODS` on the same batch (random: one
    order), plus `ours_method_name(ln, loss)` when the options are not the paper's.

    # images: [B, 3, H, W], class_index: [B] -> {method: importance [B, N]}
    """
    importances = {"ours": global_importance(block_head_importance(model, images, class_index, source))}
    variant = ours_method_name(ln, loss)
    if variant != "ours":
        importances[variant] = global_importance(block_head_importance(model, images, class_index, source, ln, loss))
    return {**importances, **baseline_importances(model, images, class_index, seed)}


@dataclass(frozen=True)
class PerturbationCurve:
    """One method's deletion test on a batch: the prediction at every kept count."""

    method: str
    test: str  # "negative" (most important kept first) or "positive" (least important first)
    kept_counts: torch.Tensor  # [K] int64, n image tokens kept (plus the prefix), 0..N
    num_image_tokens: int  # N
    predictions: torch.Tensor  # [K, B] int64
    labels: torch.Tensor  # [B] int64, the true classes
    order: int = 0  # random order 0..R-1 of method "random"; 0 for every other method

    @property
    def correct(self) -> torch.Tensor:
        """Top-1 correctness per kept count and image. # -> [K, B] bool"""
        return self.predictions == self.labels[None, :].to(self.predictions.device)

    @property
    def kept_fraction(self) -> torch.Tensor:
        """n / N per point. # -> [K] float64"""
        return self.kept_counts.double() / self.num_image_tokens

    @property
    def accuracy(self) -> torch.Tensor:
        """Top-1 accuracy per kept count. # -> [K]"""
        return self.correct.float().mean(dim=1)

    @property
    def auc(self) -> float:
        """Trapezoid AUC over the kept fraction in [0, 1]."""
        return curve_auc(self.accuracy.cpu(), self.kept_fraction.cpu())

    @property
    def reference_auc(self) -> float:
        """The reference code's normalisation Σ_{n=1}^{N−1} acc_n / (N · max acc)
        (`reference_normalised_auc`: exact when every n was run)."""
        return reference_normalised_auc(self.accuracy, self.kept_counts, self.num_image_tokens)


def perturbation_curves(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    importances: dict[str, torch.Tensor],
    kept_counts: torch.Tensor | None = None,
) -> list[PerturbationCurve]:
    """Negative and positive deletion tests for every method's importance (each test run).

    # images: [B, 3, H, W], labels: [B], importances: {method: [B, N]}, kept_counts: [K] -> curves
    """
    num_image_tokens = next(iter(importances.values())).shape[1]
    if kept_counts is None:
        kept_counts = kept_token_counts(num_image_tokens)
    return [
        PerturbationCurve(method, test, kept_counts.cpu(), num_image_tokens,
                          deletion_predictions(model, images, importance, test, kept_counts), labels)
        for method, importance in importances.items()
        for test in DELETION_TESTS
    ]


def random_order_curves(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    orders: torch.Tensor,
    kept_counts: torch.Tensor | None = None,
) -> list[PerturbationCurve]:
    """The random baseline's curves: each order's deletion curve computed ONCE (keeping its
    highest ranks first) and stored for both tests — for a uniformly random order the
    negative and positive tests are the same distribution. Curves are ordered order × test.

    # images: [B, 3, H, W], labels: [B], orders: [R, B, N], kept_counts: [K] -> 2R curves
    """
    num_image_tokens = orders.shape[-1]
    if kept_counts is None:
        kept_counts = kept_token_counts(num_image_tokens)
    curves = []
    for order, importance in enumerate(orders):
        predictions = deletion_predictions(model, images, importance, "negative", kept_counts)  # [K, B]
        curves += [PerturbationCurve(RANDOM_METHOD, test, kept_counts.cpu(), num_image_tokens, predictions,
                                     labels, order) for test in DELETION_TESTS]
    return curves


@dataclass(frozen=True)
class ExplainBatch:
    """Everything the `explain` experiment keeps of one batch."""

    class_of_interest: torch.Tensor  # [B] int64
    block_head: torch.Tensor  # [B, L, H, N] the paper's importance per block and head
    baselines: dict[str, torch.Tensor]  # {method: [B, N]} global maps of the baselines (random: order 0)
    curves: list[PerturbationCurve]  # every method x both tests (random: every order x both tests)
    # {ours_method_name(ln, loss): [B, N]}: the beyond-paper variant's global map (empty by default)
    variants: dict[str, torch.Tensor] = field(default_factory=dict)
    random_orders: torch.Tensor | None = None  # [R, B, N] every random order's importance (ranks)


def explain_batch(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    target: str = "true",
    source: GradientSource = "resid",
    curve_points: int = 0,
    seed: int = 0,
    ln: NormScale = "live",
    loss: GradientLoss = "ce",
    random_orders: int = 10,
) -> ExplainBatch:
    """The paper's gradients, every baseline and every deletion curve on one batch.

    `target` picks the class of interest: "true" (the label) or "predicted" (the model's
    top-1). The deletion tests always score against the true label. `curve_points` = 0
    evaluates every kept count n = 0..N, else that many evenly spaced counts. `ours` is
    always the paper's method; `ln` / `loss` other than ("live", "ce") add the variant
    `ours_method_name(ln, loss)` (global map + both curves). The random baseline draws
    `random_orders` orders from `seed`; each order's curve is run once and stored for both
    tests (the two tests of a random order are the same distribution).

    # images: [B, 3, H, W], labels: [B] -> ExplainBatch
    """
    check_explain_options(source, ln, loss)
    if isinstance(random_orders, bool) or not isinstance(random_orders, int) or random_orders < 1:
        raise ValueError(f"random_orders must be an integer >= 1, got {random_orders!r}")
    num_classes = model.num_classes
    if labels.shape != images.shape[:1] or bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels must hold one class in [0, {num_classes}) per image, got {labels.tolist()}")
    if target == "true":
        class_of_interest = labels
    elif target == "predicted":
        with torch.no_grad():
            class_of_interest = model(images).argmax(dim=1)
    else:
        raise ValueError(f"target must be 'true' or 'predicted', got {target!r}")
    block_head = block_head_importance(model, images, class_of_interest, source)
    variants: dict[str, torch.Tensor] = {}
    variant = ours_method_name(ln, loss)
    if variant != "ours":
        variants[variant] = global_importance(block_head_importance(model, images, class_of_interest, source, ln, loss))
    baselines = baseline_importances(model, images, class_of_interest, seed)
    num_image_tokens = block_head.shape[-1]
    orders = draw_random_orders(images.shape[0], num_image_tokens, seed, random_orders).to(images.device)  # [R, B, N]
    baselines[RANDOM_METHOD] = orders[0]  # == baseline_importances' own draw (same seed)
    importances = {"ours": global_importance(block_head), **variants,
                   **{m: v for m, v in baselines.items() if m != RANDOM_METHOD}}
    kept_counts = kept_token_counts(num_image_tokens, curve_points)
    curves = perturbation_curves(model, images, labels, importances, kept_counts)
    curves += random_order_curves(model, images, labels, orders, kept_counts)
    return ExplainBatch(class_of_interest, block_head, baselines, curves, variants, orders)
