"""`ModelAdapter`: one timm model family's anatomy behind the one interface the lens uses,
the `ViTAnatomy` it describes, and the `AttentionArgs` its blocks receive.

The lens (`Lens`), the perturbations, explainability (`vitlens.explain`) and the shard job
see a model only through its adapter: the embedded sequence, one `BlockTrace` per block,
the pooling-aware projection onto class space (METHOD §1b), the model's own output, the
value vectors of each sub-layer, and which experiments apply. Adding a family is one module
in this package (a subclass registered in `vitlens/lens/families/__init__.py`) plus its
tests, built from the helpers in `families/common.py`; `docs/families.md` says what each
family does.

Conventions every adapter keeps (METHOD §1b):
- `embed(images)` is the residual stream entering block 1 (the lens's block 0), laid out as
  the sequence the head finally reads: `P` prefix tokens (CLS, distillation, registers)
  then `N` image tokens, row-major over `anatomy.grid_size`. Families that insert the CLS
  token late (CaiT, XCiT) return only the image tokens and say so with `first_token = 1`
  in their traces until the class-attention blocks.
- `block_forward` (or `trace_block`, its one-argument form) calls the model's own submodules
  in timm's order, so the last trace's `resid_post` gives `model_logits(...) == model(x)`.
- `project(h)` projects any token as if it were the whole sequence the head reads: the
  model's own pooling on that token alone, then its norms and head, bias included.
- `parity_logits(resid_final)` projects what the head really reads (CLS token, the mean of
  the image tokens, the mean of the two distilled heads...) and must equal `model(x)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from vitlens.errors import UserError
from vitlens.lens.attention import ProbsEdit, attend
from vitlens.lens.classifiers import ZeroShotClassifier
from vitlens.lens.families.attention_heads import AttentionHeads, layer_scale_vector, output_heads
from vitlens.lens.mlp import mlp_values
from vitlens.lens.trace import BlockTrace

SUBLAYERS: tuple[str, ...] = ("attn", "mlp")

#: Experiments a family may skip, with the reason recorded in `ViTAnatomy.skipped`.
PERTURBATION_EXPERIMENTS: tuple[str, ...] = (
    "attn_self_only", "attn_no_cls", "remove_class_tokens", "remove_context_tokens",
)
EXPLAIN_EXPERIMENT = "explain"
#: The per-head attribution experiment (METHOD §3b, `vitlens.lens.heads`).
HEADS_EXPERIMENT = "heads"


@dataclass(frozen=True)
class ViTAnatomy:
    """Static facts about one supported model, checked once by its family adapter."""

    family: str  # the adapter's family, e.g. "vit", "eva", "cait"
    num_blocks: int
    num_prefix_tokens: int  # CLS + distillation + register tokens, at the start of the sequence
    has_class_token: bool
    global_pool: str  # "token" (CLS), "avg" (GAP), "map" (attention pooling), ...
    embed_dim: int
    num_classes: int
    mlp_width: int
    grid_size: tuple[int, int] = (0, 0)  # image tokens per column and row (patch_embed.grid_size)
    token_cell: tuple[int, int] = (0, 0)  # input pixels (h, w) one image token covers: img_size / grid_size
    post_norm: bool = False  # ViT ResPostBlock models: sub-layer streams after the block's own norms
    cls_from_block: int = 0  # first block slot whose residual stream holds the CLS token (CaiT, XCiT: > 0)
    skipped: tuple[tuple[str, str], ...] = ()  # (experiment, one-line reason) that do not apply

    @property
    def is_gap(self) -> bool:
        """True for average-pooling models (every token is an image token when no prefix)."""
        return self.global_pool == "avg"

    @property
    def num_image_tokens(self) -> int:
        """N, the image tokens of the token grid."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_tokens(self) -> int:
        """T = P + N, the full sequence the head reads."""
        return self.num_prefix_tokens + self.num_image_tokens

    @property
    def pools_class_token(self) -> bool:
        """True when the head reads the CLS token (explainability differentiates it)."""
        return self.has_class_token and self.global_pool == "token"

    def skip_reason(self, experiment: str) -> str | None:
        """Why `experiment` does not apply to this model, or None when it does."""
        return dict(self.skipped).get(experiment)


class AttentionArgs(NamedTuple):
    """What the lens asks of every attention sub-layer of one block (see
    `ModelAdapter.block_forward`), in the order `attention_sublayer(attn, x, *args)` takes them.

    # keep_mask: [T, T], key_keep: [B, T] bool (both over the full sequence)
    """

    keep_mask: torch.Tensor | None = None
    need_probs: bool = False
    key_keep: torch.Tensor | None = None
    probs_edit: ProbsEdit | None = None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`vitlens.lens.attention.attend` with these arguments (and an additive `bias`).

        # q: [B, H, Tq, hd], k, v: [B, H, Tk, hd], bias: [B or 1, H or 1, Tq, Tk]
        #   -> (heads_out [B, H, Tq, hd], probs [B, H, Tq, Tk] | None)
        """
        return attend(q, k, v, scale, self.keep_mask, self.need_probs, self.key_keep, bias=bias,
                      probs_edit=self.probs_edit)

    def covering(self, start: int, queries: int | None = None) -> AttentionArgs:
        """The masks sliced to a block that covers fewer positions: keys from `start`, queries
        `start .. start + queries` (None: all from `start`).

        # keep_mask: [T, T], key_keep: [B, T] -> [Tq, T - start], [B, T - start]
        """
        keep_mask, key_keep = self.keep_mask, self.key_keep
        if keep_mask is not None:
            keep_mask = keep_mask[start:None if queries is None else start + queries, start:]
        if key_keep is not None:
            key_keep = key_keep[:, start:]
        return self._replace(keep_mask=keep_mask, key_keep=key_keep)


class ModelAdapter(ABC):
    """The lens's view of one timm model; construct with `vitlens.lens.families.adapter_for`."""

    #: family name printed by `vitlens models check` and the coverage sweep
    family: ClassVar[str] = ""
    #: the timm model classes this adapter handles (exact classes or base classes)
    model_classes: ClassVar[tuple[type, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A registered adapter implements `block_forward` or its one-argument form `trace_block`."""
        super().__init_subclass__(**kwargs)
        if cls.model_classes and ModelAdapter.block_forward is cls.block_forward \
                and ModelAdapter.trace_block is cls.trace_block:
            raise TypeError(f"{cls.__name__} implements neither block_forward nor trace_block")

    def __init__(self, model: torch.nn.Module) -> None:
        """Check `model` (raises `UserError` with a one-line reason if the family's rule
        cannot hold for it) and describe it."""
        self.model = model
        head = getattr(model, "head", None)
        if not isinstance(head, torch.nn.Linear):
            if isinstance(model, ZeroShotClassifier):
                raise UserError(
                    f"{type(model.tower).__name__} ({model.library}) has no class space: build one from "
                    "class names with 'vitlens heads zeroshot' and give it as a head file ([heads] in the "
                    "job, --head FILE), or name classes in the variant ([models.NAME] classes = ...)"
                )
            raise UserError(
                f"{type(model).__name__} has no linear classifier head (num_classes=0: a headless "
                "model): give it a head checkpoint ([heads] in the job, --head FILE) or num_classes "
                "for a random twin ([models.NAME] num_classes = ...)"
            )
        self.check()
        anatomy = self.describe()
        reason = self.heads_problem(anatomy)
        if reason is not None and anatomy.skip_reason(HEADS_EXPERIMENT) is None:
            anatomy = replace(anatomy, skipped=anatomy.skipped + ((HEADS_EXPERIMENT, reason),))
        self.anatomy = anatomy

    # ---- anatomy -------------------------------------------------------------------------
    @abstractmethod
    def check(self) -> None:
        """Raise `UserError` naming what this adapter cannot analyse exactly."""

    @abstractmethod
    def describe(self) -> ViTAnatomy:
        """The static facts of the checked model."""

    # ---- forward -------------------------------------------------------------------------
    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Residual stream entering block 1 (see the module notes for the layout).

        # images: [B, 3, H, W] -> hidden: [B, T0, d]
        """

    def block_forward(
        self,
        index: int,
        resid_pre: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        need_probs: bool = False,
        key_keep: torch.Tensor | None = None,
        probs_edit: ProbsEdit | None = None,
    ) -> BlockTrace:
        """Block `index` (1-based) on its input, exposing every stream.

        `keep_mask` multiplies the post-softmax attention (METHOD §4), `key_keep` removes
        tokens as keys, `probs_edit` rewrites the (post-mask) probabilities before they
        weight the values (the explainability branch). Both masks are given over the full
        sequence; a block that covers fewer positions slices them itself
        (`AttentionArgs.covering`). A family implements this, or `trace_block`.

        # resid_pre: [B, T', d], keep_mask: [T, T], key_keep: [B, T] bool -> BlockTrace
        """
        return self.trace_block(index, resid_pre, AttentionArgs(keep_mask, need_probs, key_keep, probs_edit))

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """`block_forward` with its attention arguments in one `AttentionArgs`: what a family
        implements when it does not override `block_forward` itself.

        # resid_pre: [B, T', d] -> BlockTrace
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither block_forward nor trace_block")

    def iter_block_traces(
        self,
        hidden: torch.Tensor,
        keep_mask: torch.Tensor | None = None,
        need_probs: bool = False,
        key_keep: torch.Tensor | None = None,
    ) -> Iterator[BlockTrace]:
        """Every block on the embedded sequence, one trace at a time, in order.

        # hidden: [B, T0, d] (from `embed`) -> BlockTrace per block
        """
        for index in range(1, self.anatomy.num_blocks + 1):
            trace = self.block_forward(index, hidden, keep_mask, need_probs, key_keep)
            hidden = trace.resid_post
            yield trace

    def run_blocks(self, hidden: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output (no streams kept).

        # hidden: [B, T0, d], key_keep: [B, T] bool -> resid_final: [B, T, d]
        """
        for trace in self.iter_block_traces(hidden, key_keep=key_keep):
            hidden = trace.resid_post
        return hidden

    def logits_keeping(self, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The model's output when only the prefix and the image tokens at sequence positions
        `kept` remain (METHOD §4 token removal; generic: the others excluded as keys at full
        length, which keeps rotary / relative position terms right).

        # hidden: [B, T, d] (from `embed`), kept: [B, n] int64 positions -> logits: [B, C]
        """
        key_keep = torch.zeros(hidden.shape[0], self.anatomy.num_tokens, dtype=torch.bool, device=hidden.device)
        key_keep[:, : self.anatomy.num_prefix_tokens] = True
        key_keep.scatter_(1, kept, True)
        return self.model_logits(self.run_blocks(hidden, key_keep), key_keep)

    @abstractmethod
    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own output from the last residual stream (with `key_keep`: the output
        on the shortened sequence, e.g. average pooling over the kept image tokens only).

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """

    # ---- projection ----------------------------------------------------------------------
    def norm_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """The per-token part of the head path before the linear head: timm's
        `fc_norm(pool(norm(h)))` of the token alone — the mean / max of one token is the
        token; an attention pool (`map`, `attn_pool`) runs on the one-token sequence. Families
        whose head path differs override it.

        # hidden: [..., d] -> [..., d_head]
        """
        model = self.model
        normed = model.norm(hidden)
        if getattr(model, "attn_pool", None) is not None:
            shape = normed.shape
            normed = model.attn_pool(normed.reshape(-1, 1, shape[-1])).reshape(shape)  # [n, 1, d] -> [n, d]
        fc_norm = getattr(model, "fc_norm", None)
        return fc_norm(normed) if fc_norm is not None else normed

    def final_norms(self) -> list[tuple[str, torch.nn.Module]]:
        """The norms of the head path that normalise a token (METHOD §6's `ln="frozen"` detaches
        their per-token scale), named for messages: timm's `norm` and `fc_norm` (Identity left
        out). Families whose head path has other norms override it."""
        found = []
        for name in ("norm", "fc_norm"):
            module = getattr(self.model, name, None)
            if module is not None and not isinstance(module, torch.nn.Identity):
                found.append((name, module))
        return found

    def class_embedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The class embedding `E` and bias `e` the projection applies (METHOD §1).

        # -> (E [C, d_head], e [C] | None)
        """
        return self.model.head.weight, self.model.head.bias

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """`proj(h) = E · norm_final(h) + e`, bias included (METHOD §1, §1b).

        # hidden: [..., d] -> logits: [..., C]
        """
        weight, bias = self.class_embedding()
        return F.linear(self.norm_final(hidden), weight, bias)

    def correct_class_logit(self, hidden: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
        """Only the correct-class logit of `project(hidden)`: one dot product per token.

        # hidden: [B, T, d], class_index: [B] -> [B, T]
        """
        weight, bias = self.class_embedding()
        logit = torch.einsum("btd,bd->bt", self.norm_final(hidden), weight[class_index])
        if bias is not None:
            logit = logit + bias[class_index][:, None]
        return logit

    @abstractmethod
    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """The projection of what the head really reads at the last block (METHOD §1b parity).

        # resid_final: [B, T, d] -> logits: [B, C], equal to model(x)
        """

    # ---- explainability ------------------------------------------------------------------
    def cls_branch(
        self, index: int, trace: BlockTrace, cls_row: torch.Tensor, source: str
    ) -> torch.Tensor:
        """Block `index`'s CLS stream recomputed, with gradients, from the leaf `cls_row` — the
        post-softmax attention the CLS query (query 0 of the block's sub-layer tokens) gives
        every key (METHOD §6). Generic: the whole block again from its detached input, the CLS
        row swapped for the leaf; adapters may override it with a CLS-only branch.

        # cls_row: [B, H, T'] (leaf) -> x_cls: [B, d] (`source` "resid": block output; "attn":
        #   the attention sub-layer's output)
        """

        def swap_cls_row(probs: torch.Tensor) -> torch.Tensor:
            return torch.cat([cls_row[:, :, None, :], probs[:, :, 1:].detach()], dim=2)

        branch = self.block_forward(index, trace.resid_pre.detach(), need_probs=True, probs_edit=swap_cls_row)
        if source == "attn":
            return branch.attn_out[:, 0]
        return branch.resid_post[:, 0]

    # ---- heads (METHOD §3b) ----------------------------------------------------------------
    def attention_heads(self, index: int) -> AttentionHeads:
        """Block `index`'s attention output as a linear map of its coefficients: timm's standard
        anatomy, `blocks[index - 1].attn.proj` and the layer scale `ls1` or `gamma_1`. Raises
        `UserError` with the reason where the attention output is not a per-head sum (a norm or
        gate over the merged heads, a post-norm block). Families with other blocks override it.

        # -> AttentionHeads (weight [d, Ma], bias [d] | None)
        """
        block = self.model.blocks[index - 1]
        attn = block.attn
        norm = getattr(attn, "norm", None)
        if norm is not None and not isinstance(norm, torch.nn.Identity):
            raise UserError(f"block {index}: a norm over the merged heads ({type(norm).__name__}) mixes the heads")
        if getattr(attn, "gate", None) is not None:
            raise UserError(f"block {index}: a gate on the merged heads scales each head per token")
        scale = getattr(block, "ls1", None)
        if scale is None:
            scale = getattr(block, "gamma_1", None)
        return output_heads(attn.proj, layer_scale_vector(scale), attn.num_heads)

    def heads_problem(self, anatomy: ViTAnatomy) -> str | None:
        """Why per-head attribution (METHOD §3b) does not apply to this model, or None: a
        post-norm block, an attention-pooling head, a block whose attention output is no
        per-head sum (`attention_heads`) or whose values the family does not expose."""
        if anatomy.post_norm:
            return "post-norm blocks: the attention output passes the block's own norm, not a per-head sum"
        if anatomy.global_pool == "map":
            return ("the head pools by attention (global_pool='map'): its own norm and layers (an MLP in timm's "
                    "and SigLIP's) are not linearised by freezing the final norm's scale")
        try:
            for index in range(1, anatomy.num_blocks + 1):
                self.attention_heads(index)
        except UserError as error:
            return str(error)
        return None

    # ---- memories ------------------------------------------------------------------------
    def value_vectors(self, index: int, sublayer: str) -> torch.Tensor:
        """Value vectors (columns) of sub-layer `sublayer` ("attn" / "mlp") of block `index`:
        timm's standard anatomy, `blocks[index - 1].attn.proj` and `.mlp.fc2` (METHOD §3).
        Families with other blocks override it.

        # -> values: [d, M]
        """
        check_sublayer(sublayer)
        block = self.model.blocks[index - 1]
        return block.attn.proj.weight if sublayer == "attn" else mlp_values(block.mlp)


def check_sublayer(sublayer: str) -> None:
    """Raise ValueError for a sub-layer name other than `SUBLAYERS`."""
    if sublayer not in SUBLAYERS:
        raise ValueError(f"unknown sub-layer {sublayer!r}: use one of {SUBLAYERS}")
