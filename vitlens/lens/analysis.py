"""`Lens`: the hooked forward with every stream projected and reduced on the device.

Per batch: one forward over the unmodified timm modules; per (block, stream) one projection
matmul over all B×T tokens, reduced at once to rank / correct logit / top-k (and the memory
flags for the sub-layers); only one [B, T, C] logits tensor is alive at a time; hidden
states are never kept past their block. No Python loop runs over images or tokens.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from vitlens.errors import UserError
from vitlens.lens.anatomy import describe_model, project
from vitlens.lens.forward import embed, iter_block_traces, model_logits
from vitlens.lens.memories import build_memory_tables, token_memory_flags
from vitlens.lens.output import STREAM_ATTN, STREAM_MLP, STREAM_RESID, LensBatch
from vitlens.lens.perturb import AttentionPerturbation, attention_keep_mask
from vitlens.lens.reduce import LogitReduction, correct_class_logit, reduce_logits

DEFAULT_TOP_K = 5


class Lens:
    """The class-embedding-space lens over one timm ViT (checked once, memory tables cached)."""

    def __init__(self, model: VisionTransformer, top_k: int = DEFAULT_TOP_K) -> None:
        """Describe `model` (raises `UserError` if unsupported) and precompute its memory tables.

        Move the model to its device first: the tables live where its parameters are.
        """
        self.model = model
        self.anatomy = describe_model(model)
        self.top_k = min(top_k, self.anatomy.num_classes)
        self.memory_tables = build_memory_tables(model, top_k)

    def run(
        self,
        images: torch.Tensor,
        class_index: torch.Tensor,
        attention_perturbation: AttentionPerturbation | None = None,
        token_keep: torch.Tensor | None = None,
    ) -> LensBatch:
        """Analyse one batch: every token, block and stream reduced to a `LensBatch` on the device.

        `attention_perturbation` ("self_only" / "no_cls") masks the post-softmax attention of
        every block; `token_keep` removes image tokens after the position embedding. Images
        keeping different numbers of tokens are run in groups of equal count, and their
        results are written back at the tokens' original positions.

        # images: [B, 3, H, W], class_index: [B] int64, token_keep: [B, N] bool -> LensBatch
        """
        class_index = class_index.to(images.device)
        num_classes = self.anatomy.num_classes
        out_of_range = (class_index < 0) | (class_index >= num_classes)
        if class_index.shape != images.shape[:1] or bool(out_of_range.any()):
            raise UserError(
                f"class_index must hold one label in [0, {num_classes}) per image "
                f"(got shape {tuple(class_index.shape)} for {images.shape[0]} images): "
                "do the data's labels belong to this model's label space?"
            )
        with torch.inference_mode():
            if token_keep is None:
                return self._run_group(images, class_index, attention_perturbation, None)
            token_keep = token_keep.to(device=images.device, dtype=torch.bool)
            prefix = self.anatomy.num_prefix_tokens
            out = LensBatch.empty(
                class_index, self.anatomy.num_blocks, prefix + token_keep.shape[1], self.top_k,
                prefix, self.anatomy.num_classes,
            )
            kept_counts = token_keep.sum(dim=1)
            for count in torch.unique(kept_counts).tolist():
                members = torch.nonzero(kept_counts == count).squeeze(1)
                group = self._run_group(
                    images[members], class_index[members], attention_perturbation, token_keep[members]
                )
                kept_positions = torch.nonzero(token_keep[members])[:, 1].view(len(members), count)
                prefix_positions = torch.arange(prefix, device=images.device).expand(len(members), prefix)
                positions = torch.cat([prefix_positions, kept_positions + prefix], dim=1)
                _scatter_group(out, group, members, positions)
            return out

    def _run_group(
        self,
        images: torch.Tensor,
        class_index: torch.Tensor,
        attention_perturbation: AttentionPerturbation | None,
        token_keep: torch.Tensor | None,
    ) -> LensBatch:
        """Analyse images that all keep the same tokens count (one forward pass).

        # images: [B, 3, H, W], class_index: [B], token_keep: [B, N] -> LensBatch with T = P+n
        """
        model, anatomy = self.model, self.anatomy
        hidden = embed(model, images, anatomy, token_keep)
        num_tokens = hidden.shape[1]
        out = LensBatch.empty(
            class_index, anatomy.num_blocks, num_tokens, self.top_k,
            anatomy.num_prefix_tokens, anatomy.num_classes,
        )
        out.token_present.fill_(True)
        keep_mask = None
        if attention_perturbation is not None:
            keep_mask = attention_keep_mask(
                attention_perturbation, num_tokens, anatomy.num_prefix_tokens,
                anatomy.has_class_token, device=hidden.device,
            )
        self._write_stream(out, 0, STREAM_RESID, hidden, class_index)
        resid_final = hidden
        for trace in iter_block_traces(model, hidden, anatomy, keep_mask):
            block = trace.index
            self._write_stream(out, block, STREAM_RESID, trace.resid_post, class_index)
            sublayers = (
                (STREAM_ATTN, "attn", trace.attn_out, trace.attn_coefficients,
                 out.correct_logit[:, block - 1, STREAM_RESID]),
                (STREAM_MLP, "mlp", trace.mlp_out, trace.mlp_coefficients,
                 correct_class_logit(model, trace.resid_mid, class_index)),
            )
            for stream, sublayer, output, coefficients, input_logit in sublayers:
                reduction = self._write_stream(out, block, stream, output, class_index)
                out.input_correct_logit[:, block, stream] = input_logit
                agreement, non_compositional = token_memory_flags(
                    coefficients, self.memory_tables[block - 1][sublayer], class_index,
                    reduction.topk_class[..., 0], self.top_k,
                )
                out.key_value_agreement[:, block, stream] = agreement
                out.non_compositional[:, block, stream] = non_compositional
            resid_final = trace.resid_post
        out.prediction = model_logits(model, resid_final).argmax(dim=-1)
        out.correct = out.prediction == class_index
        return out

    def _write_stream(
        self, out: LensBatch, block: int, stream: int, hidden: torch.Tensor, class_index: torch.Tensor
    ) -> LogitReduction:
        """Project one (block, stream), reduce it and write it into `out`.

        # hidden: [B, T, d], class_index: [B] -> LogitReduction ([B, T] fields)
        """
        reduction = reduce_logits(project(self.model, hidden), class_index, self.top_k)
        out.rank[:, block, stream] = reduction.rank
        out.correct_logit[:, block, stream] = reduction.correct_logit
        out.topk_class[:, block, stream] = reduction.topk_class
        out.topk_logit[:, block, stream] = reduction.topk_logit
        return reduction


PER_TOKEN_FIELDS: tuple[str, ...] = (
    "rank", "correct_logit", "topk_class", "topk_logit", "input_correct_logit",
    "key_value_agreement", "non_compositional",
)


def _scatter_group(out: LensBatch, group: LensBatch, members: torch.Tensor, positions: torch.Tensor) -> None:
    """Write a group's results into `out` at its images `members` and token `positions`.

    # members: [G] image indices, positions: [G, T'] original token positions
    """
    rows = members[:, None]
    for name in PER_TOKEN_FIELDS:
        # advanced indices around slices put (G, T') first: [G, T', L+1, 3, ...]
        getattr(out, name)[rows, :, :, positions] = getattr(group, name).movedim(3, 1)
    out.token_present[rows, positions] = True
    out.prediction[members] = group.prediction
    out.correct[members] = group.correct
