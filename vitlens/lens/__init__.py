"""The class-embedding-space lens: hooked forward over unmodified timm ViTs, projection,
on-device reduction and perturbations (design notes: `vitlens/lens/README.md`)."""

from vitlens.lens.analysis import DEFAULT_TOP_K, Lens
from vitlens.lens.anatomy import ViTAnatomy, describe_model, project
from vitlens.lens.forward import BlockTrace, block_forward, embed, iter_block_traces, model_logits
from vitlens.lens.memories import SUBLAYERS, MemoryTable, build_memory_tables, value_vectors
from vitlens.lens.output import STREAM_ATTN, STREAM_MLP, STREAM_RESID, STREAMS, LensBatch
from vitlens.lens.perturb import ATTENTION_PERTURBATIONS, attention_keep_mask, token_keep_from_labels

__all__ = [
    "ATTENTION_PERTURBATIONS",
    "DEFAULT_TOP_K",
    "STREAMS",
    "STREAM_ATTN",
    "STREAM_MLP",
    "STREAM_RESID",
    "SUBLAYERS",
    "BlockTrace",
    "Lens",
    "LensBatch",
    "MemoryTable",
    "ViTAnatomy",
    "attention_keep_mask",
    "block_forward",
    "build_memory_tables",
    "describe_model",
    "embed",
    "iter_block_traces",
    "model_logits",
    "project",
    "token_keep_from_labels",
    "value_vectors",
]
