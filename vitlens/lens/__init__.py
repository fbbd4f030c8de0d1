"""The class-embedding-space lens: hooked forward over unmodified timm models (one adapter per
family, `vitlens/lens/families/`), projection, on-device reduction and perturbations (design notes: `vitlens/lens/README.md`)."""

from vitlens.lens.analysis import DEFAULT_TOP_K, Lens
from vitlens.lens.anatomy import ViTAnatomy, describe_model, project
from vitlens.lens.families import ModelAdapter, adapter_for
from vitlens.lens.forward import BlockTrace, embed, iter_block_traces, model_logits
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
    "ModelAdapter",
    "ViTAnatomy",
    "attention_keep_mask",
    "adapter_for",
    "build_memory_tables",
    "describe_model",
    "embed",
    "iter_block_traces",
    "model_logits",
    "project",
    "token_keep_from_labels",
    "value_vectors",
]
