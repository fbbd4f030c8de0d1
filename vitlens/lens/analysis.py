"""`Lens`: the hooked forward with every stream projected and reduced on the device.

Per batch: one forward over the unmodified timm modules; per (block, stream) one projection
matmul over all B×T tokens, reduced at once to rank / correct logit / top-k (and the memory
flags for the sub-layers); only one [B, T, C] logits tensor is alive at a time; hidden
states are never kept past their block. No Python loop runs over images or tokens.
"""

from __future__ import annotations

import torch

from vitlens.errors import UserError
from vitlens.lens.families import ModelAdapter, adapter_for
from vitlens.lens.memories import build_memory_tables, token_memory_flags
from vitlens.lens.output import CLASS_FILL, RANK_FILL, STREAM_ATTN, STREAM_MLP, STREAM_RESID, LensBatch
from vitlens.lens.perturb import AttentionPerturbation, attention_keep_mask
from vitlens.lens.precision import Precision, check_precision, forward_precision, in_precision
from vitlens.lens.reduce import LogitReduction, reduce_logits

DEFAULT_TOP_K = 5


class Lens:
    """The class-embedding-space lens over one timm model (checked once, memory tables cached)."""

    def __init__(self, model: torch.nn.Module, top_k: int = DEFAULT_TOP_K, precision: Precision = "fp32") -> None:
        """Check `model` through its family adapter (raises `UserError` if unsupported) and
        precompute its memory tables.

        `precision` is the forward's arithmetic (`vitlens.lens.precision`): "fp32", "tf32"
        or "bf16"; every projection, rank and top-k is computed from fp32 logits.
        Move the model to its device first: the tables live where its parameters are.
        """
        self.precision = check_precision(precision)
        self.model = model
        self.adapter: ModelAdapter = adapter_for(model)
        self.anatomy = self.adapter.anatomy
        self.top_k = min(top_k, self.anatomy.num_classes)
        self.memory_tables = build_memory_tables(self.adapter, top_k)

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
            self._write_stream(out, 0, STREAM_RESID, hidden, class_index, num_tokens - hidden.shape[1])
            resid_final = hidden
            for trace in in_precision(adapter.iter_block_traces(hidden, keep_mask, key_keep=key_keep),
                                      self.precision, images.device):
                block, start = trace.index, trace.first_token
                self._write_stream(out, block, STREAM_RESID, trace.resid_post, class_index, num_tokens - trace.resid_post.shape[1])
                covered = trace.attn_out.shape[1]  # the sub-layer tokens S
                if start == 0 and trace.sublayer_tokens is None and trace.resid_pre.shape[1] == num_tokens:
                    attn_input_logit = out.correct_logit[:, block - 1, STREAM_RESID]
                else:
                    attn_input_logit = adapter.correct_class_logit(trace.resid_pre[:, :covered].float(), class_index)
                sublayers = (
                    (STREAM_ATTN, "attn", trace.attn_out, trace.attn_coefficients, attn_input_logit),
                    (STREAM_MLP, "mlp", trace.mlp_out, trace.mlp_coefficients,
                     adapter.correct_class_logit(trace.resid_mid[:, :covered].float(), class_index)),
                )
                for stream, sublayer, output, coefficients, input_logit in sublayers:
                    reduction = self._write_stream(out, block, stream, output, class_index, start)
                    positions = slice(start, start + covered)
                    out.input_correct_logit[:, block, stream, positions] = input_logit
                    agreement, non_compositional = token_memory_flags(
                        coefficients.float(), self.memory_tables[block - 1][sublayer], class_index,
                        reduction.topk_class[..., 0], self.top_k,
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

    def _write_stream(
        self, out: LensBatch, block: int, stream: int, hidden: torch.Tensor, class_index: torch.Tensor,
        start: int = 0,
    ) -> LogitReduction:
        """Project one (block, stream), reduce it and write it into `out` at token positions
        `start .. start + T'` (positions a block does not cover keep their fill values).

        # hidden: [B, T', d], class_index: [B] -> LogitReduction ([B, T'] fields)
        """
        reduction = reduce_logits(self.adapter.project(hidden.float()), class_index, self.top_k)
        positions = slice(start, start + hidden.shape[1])
        out.rank[:, block, stream, positions] = reduction.rank
        out.correct_logit[:, block, stream, positions] = reduction.correct_logit
        out.topk_class[:, block, stream, positions] = reduction.topk_class
        out.topk_logit[:, block, stream, positions] = reduction.topk_logit
        return reduction


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
