"""`Lens`: the hooked forward with every stream projected and reduced on the device.

Per batch: one forward over the unmodified timm modules; per block one projection matmul
over all B×T tokens of its three streams (concatenated where they cover the same tokens),
reduced at once to rank / correct logit / top-k (and, unless switched off, the memory flags
and input logits of the sub-layers); only one block's [B, 3T, C] logits are alive at a time;
hidden states are never kept past their block. No Python loop runs over images or tokens.
"""

from __future__ import annotations

import torch

from vitlens.errors import UserError
from vitlens.lens.families import ModelAdapter, adapter_for
from vitlens.lens.memories import build_memory_tables, token_memory_flags
from vitlens.lens.output import CLASS_FILL, RANK_FILL, STREAM_ATTN, STREAM_MLP, STREAM_RESID, LensBatch
from vitlens.lens.perturb import AttentionPerturbation, attention_keep_mask
from vitlens.lens.precision import Precision, check_precision, forward_precision, in_precision
from vitlens.lens.projection import Projection, projection_for
from vitlens.lens.trace import BlockTrace

DEFAULT_TOP_K = 5


class Lens:
    """The class-embedding-space lens over one timm model (checked once, memory tables cached)."""

    def __init__(
        self, model: torch.nn.Module, top_k: int = DEFAULT_TOP_K, precision: Precision = "fp32",
        projections: str = "fp32", memory_flags: bool = True, input_logits: bool = True,
    ) -> None:
        """Check `model` through its family adapter (raises `UserError` if unsupported) and
        precompute its memory tables.

        `precision` is the forward's arithmetic (`vitlens.lens.precision`): "fp32", "tf32"
        or "bf16"; every projection, rank and top-k is computed from fp32 logits.
        `projections` ("fp32" | "fast", `vitlens.lens.projection`) is how: "fast" takes low-
        precision logits and recomputes the near ties in fp32, with the same results bit for bit.
        `memory_flags=False` skips the §3 key-value flags (`key_value_agreement` and
        `non_compositional` stay False) and `input_logits=False` the sub-layers' input logits
        (`input_correct_logit` stays NaN): with both off the lens computes what other logit
        lenses give — rank, correct logit and top-k of every token, block and stream.
        Move the model to its device first: the tables live where its parameters are.
        """
        self.precision = check_precision(precision)
        self.model = model
        self.adapter: ModelAdapter = adapter_for(model)
        self.anatomy = self.adapter.anatomy
        self.top_k = min(top_k, self.anatomy.num_classes)
        self.projection: Projection = projection_for(self.adapter, projections, self.top_k)
        self.memory_flags, self.input_logits = memory_flags, input_logits
        self.memory_tables = build_memory_tables(self.adapter, top_k) if memory_flags else []

    def run(
        self,
        images: torch.Tensor,
        class_index: torch.Tensor,
        attention_perturbation: AttentionPerturbation | None = None,
        token_keep: torch.Tensor | None = None,
    ) -> LensBatch:
        """Analyse one batch: every token, block and stream reduced to a `LensBatch` on the device.

        `attention_perturbation` ("self_only" / "no_cls") masks the post-softmax attention of
        every block; `token_keep` removes image tokens after the position embedding, as
        key masking in every block (exactly the attention of the shortened sequence), so
        images keeping different numbers of tokens share one forward pass. Removed tokens
        hold fill values and `token_present` False.

        # images: [B, 3, H, W], class_index: [B] int64, token_keep: [B, N] bool -> LensBatch
        """
        model, anatomy = self.model, self.anatomy
        class_index = class_index.to(images.device)
        num_classes = anatomy.num_classes
        if class_index.shape != images.shape[:1]:
            raise UserError(f"class_index must hold one label per image "
                            f"(got shape {tuple(class_index.shape)} for {images.shape[0]} images)")
        out_of_range = (class_index < 0) | (class_index >= num_classes)
        if bool(out_of_range.any()):
            # The shard reader rejects such samples one by one when given the class count
            # (vitlens.data.reader, stage `label`); this guards every other caller.
            positions = out_of_range.nonzero().flatten().tolist()
            raise UserError(
                f"{len(positions)} of {images.shape[0]} labels lie outside this model's {num_classes} classes "
                f"[0, {num_classes}) (image {positions[0]}: {int(class_index[positions[0]])}): "
                "do the data's labels belong to this model's label space?"
            )
        adapter = self.adapter
        with torch.inference_mode():
            with forward_precision(self.precision, images.device):
                hidden = adapter.embed(images)
            batch, num_tokens = hidden.shape[0], anatomy.num_tokens
            key_keep = None
            if token_keep is not None:
                prefix = torch.ones(batch, anatomy.num_prefix_tokens, dtype=torch.bool, device=images.device)
                key_keep = torch.cat([prefix, token_keep.to(device=images.device, dtype=torch.bool)], dim=1)
            out = LensBatch.empty(
                class_index, anatomy.num_blocks, num_tokens, self.top_k,
                anatomy.num_prefix_tokens, anatomy.num_classes,
            )
            keep_mask = None
            if attention_perturbation is not None:
                keep_mask = attention_keep_mask(
                    attention_perturbation, num_tokens, anatomy.num_prefix_tokens,
                    anatomy.has_class_token, device=hidden.device,
                )
            self._write_streams(out, 0, ((STREAM_RESID, hidden, num_tokens - hidden.shape[1]),), class_index)
            resid_final = hidden
            for trace in in_precision(adapter.iter_block_traces(hidden, keep_mask, key_keep=key_keep),
                                      self.precision, images.device):
                block, start = trace.index, trace.first_token
                top1 = self._write_streams(out, block, (
                    (STREAM_RESID, trace.resid_post, num_tokens - trace.resid_post.shape[1]),
                    (STREAM_ATTN, trace.attn_out, start), (STREAM_MLP, trace.mlp_out, start),
                ), class_index)
                positions = slice(start, start + trace.attn_out.shape[1])  # the sub-layer tokens S
                if self.input_logits:
                    self._write_input_logits(out, trace, class_index, positions)
                if self.memory_flags:
                    for stream, sublayer, coefficients in ((STREAM_ATTN, "attn", trace.attn_coefficients),
                                                           (STREAM_MLP, "mlp", trace.mlp_coefficients)):
                        agreement, non_compositional = token_memory_flags(
                            coefficients.float(), self.memory_tables[block - 1][sublayer], class_index,
                            top1[stream], self.top_k,
                        )
                        out.key_value_agreement[:, block, stream, positions] = agreement
                        out.non_compositional[:, block, stream, positions] = non_compositional
                resid_final = trace.resid_post
            out.prediction = adapter.model_logits(resid_final.float(), key_keep).argmax(dim=-1)
            out.correct = out.prediction == class_index
            out.token_present.fill_(True)
            if key_keep is not None:
                _clear_removed(out, key_keep)
            return out

    def _write_streams(
        self, out: LensBatch, block: int, streams: tuple[tuple[int, torch.Tensor, int], ...],
        class_index: torch.Tensor,
    ) -> dict[int, torch.Tensor]:
        """Project the (stream, hidden, start) of one block slot, reduce them and write them into
        `out` at token positions `start .. start + T'` (positions a block does not cover keep
        their fill values); return each stream's top-1 classes. Streams of one shape and start
        (consecutive stream indices) share one projection over their tokens concatenated: each
        row of the GEMM is the same with more rows (`vitlens.lens.projection.exact_logits`).

        # hidden: [B, T', d] each, class_index: [B] -> {stream: top-1 class [B, T']}
        """
        first, hidden, start = streams[0]
        if any(h.shape != hidden.shape or s != start for _, h, s in streams):
            top1: dict[int, torch.Tensor] = {}
            for stream in streams:
                top1.update(self._write_streams(out, block, (stream,), class_index))
            return top1
        batch, tokens, count = hidden.shape[0], hidden.shape[1], len(streams)
        joined = hidden if count == 1 else torch.cat([h for _, h, _ in streams], dim=1)  # [B, n·T', d]
        reduction = self.projection.reduce(joined, class_index)
        selected = (slice(None), block, slice(first, first + count), slice(start, start + tokens))
        out.rank[selected] = reduction.rank.view(batch, count, tokens)
        out.correct_logit[selected] = reduction.correct_logit.view(batch, count, tokens)
        out.topk_class[selected] = reduction.topk_class.view(batch, count, tokens, -1)
        out.topk_logit[selected] = reduction.topk_logit.view(batch, count, tokens, -1)
        top1 = reduction.topk_class[..., 0].view(batch, count, tokens)
        return {first + index: top1[:, index] for index in range(count)}

    def _write_input_logits(
        self, out: LensBatch, trace: BlockTrace, class_index: torch.Tensor, positions: slice,
    ) -> None:
        """The correct-class logit of each sub-layer's input (the attention's: the previous
        slot's residual stream where it covers the same tokens)."""
        block, covered = trace.index, trace.attn_out.shape[1]
        adapter, num_tokens = self.adapter, self.anatomy.num_tokens
        if trace.first_token == 0 and trace.sublayer_tokens is None and trace.resid_pre.shape[1] == num_tokens:
            attn_input_logit = out.correct_logit[:, block - 1, STREAM_RESID]
        else:
            attn_input_logit = adapter.correct_class_logit(trace.resid_pre[:, :covered].float(), class_index)
        out.input_correct_logit[:, block, STREAM_ATTN, positions] = attn_input_logit
        out.input_correct_logit[:, block, STREAM_MLP, positions] = adapter.correct_class_logit(
            trace.resid_mid[:, :covered].float(), class_index)


def _clear_removed(out: LensBatch, key_keep: torch.Tensor) -> None:
    """Give removed tokens the fill values (their streams exist only as masked computation).

    # key_keep: [B, T] bool
    """
    removed = ~key_keep[:, None, None, :]  # [B, 1, 1, T] over [B, L+1, 3, T]
    out.token_present.copy_(key_keep)
    out.rank.masked_fill_(removed, RANK_FILL)
    out.correct_logit.masked_fill_(removed, float("nan"))
    out.input_correct_logit.masked_fill_(removed, float("nan"))
    out.topk_class.masked_fill_(removed[..., None], CLASS_FILL)
    out.topk_logit.masked_fill_(removed[..., None], float("nan"))
    out.key_value_agreement.masked_fill_(removed, False)
    out.non_compositional.masked_fill_(removed, False)
