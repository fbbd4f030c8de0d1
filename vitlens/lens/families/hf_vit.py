"""Hugging Face transformers image classifiers: ViT, DeiT (one head or the teacher's two), DINOv2
(with or without registers), and the transformers anatomy `hf_beit.py` shares.

The model is a transformers `*ForImageClassification` wrapped in `HFImageClassifier`
(`vitlens/lens/classifiers.py`): `self.model` is the wrapper, `self.model.tower` the unmodified
transformers model, `tower.base_model` its encoder. Each layer is recomputed from its own modules:
`layernorm_before`/`norm1`, the query/key/value Linears through `vitlens.lens.attention.attend` (so
METHOD §4's perturbations act on the same post-softmax attention as the model's eager path), the
attention output projection (its input is the attention memory coefficients, its weight columns
the attention value vectors), layer scale where the family has it, `layernorm_after`/`norm2` and the
MLP (coefficients: the first dense output before the activation; gated SwiGLU: the input of the
last projection). The embedded sequence is the model's own embeddings module (CLS, distillation and
register tokens, position embeddings with the model's own interpolation).

Two module layouts are read, so the adapters work across transformers versions: the unified
attention (`attention.q_proj/k_proj/v_proj/o_proj`, `mlp.fc1/fc2` or `gate_proj/up_proj/down_proj`,
layers in `base.layers` or `base.encoder.layer`) and the earlier one (`attention.attention.query/
key/value`, `attention.output.dense`, `intermediate.dense` + `output.dense`, DINOv2's packed
`mlp.weights_in/weights_out`). The lens never calls the model's attention, so the model's
`attn_implementation` (sdpa or eager) only enters `model(x)`, which parity compares at float
tolerance; dropout / drop-path are the identity in eval mode (the loader returns eval models).

Projection (METHOD §1b): ViT / DeiT `classifier(layernorm(h))`; the DeiT teacher model averages
`cls_classifier(layernorm(cls))` and `distillation_classifier(layernorm(dist))`, so a token is
projected through the mean of both classifiers. DINOv2's classifier reads
`concat(CLS, mean of the patch tokens)` after the final layernorm; a token alone is the whole
sequence, so `proj(h) = classifier(concat(norm h, norm h)) = (W_cls + W_patch) · norm(h) + b`: the
class embedding is the sum of the classifier's two halves (so value vectors and attributions
project in d dimensions); parity is the model's own classifier on its two inputs.

The token grid is the input size over the patch embedding convolution's stride. The input size is
the wrapper's `image_size` (the loader sets it to the image processor's output) or else the
config's `image_size`: DINOv2 checkpoints keep `image_size=518` but are run at their processor's
224 crop, with the model's own position-embedding interpolation. ViT and DeiT classifiers run only
at their config size (their forward does not interpolate), so another size is refused.

Refused with a reason (not adapters: the loader `vitlens/models/hf_classifiers.py` names them):
Swin / Swin V2 — hierarchical: windowed attention inside local windows of a few patches, patch
merging that halves the grid and doubles the width between stages, and average pooling of the
last stage; there is no single residual stream of one width for every block, and the last stage
alone (a 7 x 7 grid behind three merges) is not the paper's analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitlens.errors import UserError
from vitlens.lens.attention import merge_heads
from vitlens.lens.classifiers import HFImageClassifier
from vitlens.lens.families.attention_heads import AttentionHeads, output_heads
from vitlens.lens.families.base import AttentionArgs, ModelAdapter, ViTAnatomy, check_sublayer
from vitlens.lens.families.common import pool_tokens
from vitlens.lens.trace import BlockTrace

#: the MLP kinds `HFLayer` covers: GELU (or any activation) MLP, SwiGLU, DINOv2's packed SwiGLU
MLP_KINDS = ("plain", "swiglu", "swiglu_packed")


def hf_classes(*names: str) -> tuple[type, ...]:
    """The transformers classes of these names that the installed version has (none without it)."""
    try:
        import transformers
    except ImportError:
        return ()
    found = []
    for name in names:
        try:
            found.append(getattr(transformers, name))
        except (AttributeError, ImportError, RuntimeError):
            continue
    return tuple(found)


# ---- one encoder layer, either module layout ------------------------------------------------
@dataclass(frozen=True)
class HFLayer:
    """The parts of one pre-norm transformers encoder layer, resolved from its modules."""

    norm1: nn.Module  # layernorm_before / norm1
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    out: nn.Linear  # attention output projection: its input = attention coefficients
    norm2: nn.Module  # layernorm_after / norm2
    mlp_in: tuple[nn.Linear, ...]  # plain: (fc1,); swiglu: (gate, up); swiglu_packed: (weights_in,)
    act: Callable[[torch.Tensor], torch.Tensor]
    mlp_out: nn.Linear  # its columns are the MLP value vectors
    mlp_kind: str  # one of MLP_KINDS
    scale1: torch.Tensor | None  # layer scale of the attention output (BEiT lambda_1, DINOv2 lambda1)
    scale2: torch.Tensor | None
    num_heads: int

    @property
    def head_dim(self) -> int:
        """Width of one head."""
        return self.query.out_features // self.num_heads


def _attr(module: nn.Module, *names: str) -> nn.Module | None:
    """The first of `names` that `module` has (and is not None)."""
    for name in names:
        value = getattr(module, name, None)
        if value is not None:
            return value
    return None


def _layer_scale(value: object) -> torch.Tensor | None:
    """A layer-scale vector, or None where the layer has none (BEiT: None or the float 1.0)."""
    if isinstance(value, nn.Module):  # DINOv2's LayerScale module
        value = getattr(value, "lambda1", None)
    return value if isinstance(value, torch.Tensor) else None


def _mlp_parts(layer: nn.Module, where: str) -> tuple[tuple[nn.Linear, ...], Callable, nn.Linear, str]:
    """(input Linears, activation, output Linear, kind) of the layer's MLP, one of `MLP_KINDS`."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None and hasattr(layer, "intermediate"):  # earlier ViT / BEiT layout
        return (layer.intermediate.dense,), layer.intermediate.intermediate_act_fn, layer.output.dense, "plain"
    if hasattr(mlp, "fc1"):
        return (mlp.fc1,), _attr(mlp, "activation_fn", "activation"), mlp.fc2, "plain"
    if hasattr(mlp, "gate_proj"):
        return (mlp.gate_proj, mlp.up_proj), mlp.act_fn, mlp.down_proj, "swiglu"
    if hasattr(mlp, "weights_in"):  # earlier DINOv2 layout: one Linear packs both halves
        return (mlp.weights_in,), F.silu, mlp.weights_out, "swiglu_packed"
    raise UserError(f"{where}: unsupported MLP {type(mlp if mlp is not None else layer).__name__}")


def hf_layer(layer: nn.Module, num_heads: int, where: str) -> HFLayer:
    """Resolve `layer`'s parts (see the module notes for both layouts); refuse what is not there.

    Raises `UserError` naming `where` and the missing part.
    """
    attention = layer.attention
    if hasattr(attention, "q_proj"):
        query, key, value, out = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
    else:
        inner, output = getattr(attention, "attention", None), getattr(attention, "output", None)
        if inner is None or output is None or not hasattr(inner, "query"):
            raise UserError(f"{where}: unsupported attention {type(attention).__name__} "
                            "(no query/key/value Linears)")
        query, key, value, out = inner.query, inner.key, inner.value, output.dense
    norm1, norm2 = _attr(layer, "layernorm_before", "norm1"), _attr(layer, "layernorm_after", "norm2")
    if norm1 is None or norm2 is None:
        raise UserError(f"{where}: {type(layer).__name__} is not a pre-norm layer with two layer norms")
    mlp_in, act, mlp_out, kind = _mlp_parts(layer, where)
    if query.out_features % num_heads:
        raise UserError(f"{where}: {query.out_features} query features do not split into {num_heads} heads")
    return HFLayer(
        norm1=norm1, query=query, key=key, value=value, out=out, norm2=norm2, mlp_in=mlp_in, act=act,
        mlp_out=mlp_out, mlp_kind=kind, num_heads=num_heads,
        scale1=_layer_scale(_attr(layer, "lambda_1", "layer_scale1")),
        scale2=_layer_scale(_attr(layer, "lambda_2", "layer_scale2")),
    )


def hf_mlp_forward(parts: HFLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's MLP in the model's order, and its memory coefficients.

    # x: [B, T, d] -> (output [B, T, d], coefficients [B, T, M])
    """
    if parts.mlp_kind == "plain":
        coefficients = parts.mlp_in[0](x)  # before the activation (METHOD §3)
        return parts.mlp_out(parts.act(coefficients)), coefficients
    if parts.mlp_kind == "swiglu":
        gate, up = parts.mlp_in
        coefficients = parts.act(gate(x)) * up(x)  # gated: the input of the last projection
    else:
        x1, x2 = parts.mlp_in[0](x).chunk(2, dim=-1)
        coefficients = parts.act(x1) * x2
    return parts.mlp_out(coefficients), coefficients


def _scaled(scale: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """# x: [B, T, d] -> scale ⊙ x"""
    return x if scale is None else scale * x


def hf_layer_forward(
    parts: HFLayer, index: int, resid_pre: torch.Tensor, args: AttentionArgs, bias: torch.Tensor | None = None,
) -> BlockTrace:
    """One pre-norm layer from its parts, every stream exposed, the attention through the lens's
    `args`; `bias` (BEiT's relative position bias) is added to the attention scores.

    # resid_pre: [B, T, d], bias: [1, H, T, T] -> BlockTrace
    """
    x = parts.norm1(resid_pre)  # [B, T, d]
    batch, tokens, _ = x.shape
    heads = (batch, tokens, parts.num_heads, parts.head_dim)
    q, k, v = (linear(x).view(heads).transpose(1, 2) for linear in (parts.query, parts.key, parts.value))
    heads_out, probs = args.attend(q, k, v, parts.head_dim ** -0.5, bias=bias)  # [B, H, T, hd]
    coefficients = merge_heads(heads_out)  # [B, T, H·hd]
    attn_out = _scaled(parts.scale1, parts.out(coefficients))  # [B, T, d]
    resid_mid = resid_pre + attn_out
    mlp_raw, mlp_coefficients = hf_mlp_forward(parts, parts.norm2(resid_mid))
    mlp_out = _scaled(parts.scale2, mlp_raw)
    return BlockTrace(
        index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid, mlp_out=mlp_out,
        resid_post=resid_mid + mlp_out, attn_coefficients=coefficients, mlp_coefficients=mlp_coefficients,
        attn_probs=probs, attn_values=v,
    )


def _pair(value: object) -> tuple[int, int]:
    """An int or a pair as (h, w)."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


# ---- the shared adapter ----------------------------------------------------------------------
class HFAdapter(ModelAdapter):
    """What the transformers families share: layers, grid, embedding, blocks, value vectors.

    Subclasses give `family`, `model_classes`, the prefix tokens, the head path
    (`norm_final`, `class_embedding`, `model_logits`, `parity_logits`) and, for BEiT, the
    attention bias."""

    #: the classifier's forward runs at its config size only (no position interpolation)
    fixed_input_size: bool = False
    #: what `ViTAnatomy.global_pool` records for the head
    pool_name: str = "token"

    model: HFImageClassifier

    def final_norms(self) -> list[tuple[str, nn.Module]]:
        """The encoder's final layernorm (BEiT adds its pooler's)."""
        norms = [("base.layernorm", getattr(self.base, "layernorm", None)),
                 ("base.pooler.layernorm", getattr(getattr(self.base, "pooler", None), "layernorm", None))]
        return [(name, module) for name, module in norms if module is not None and not isinstance(module, nn.Identity)]

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, HFImageClassifier):
            raise UserError(f"{type(model).__name__} is a transformers model: wrap it in "
                            "vitlens.lens.classifiers.HFImageClassifier (the hf loader does)")
        super().__init__(model)

    # ---- parts ---------------------------------------------------------------------------
    @property
    def tower(self) -> nn.Module:
        """The transformers `*ForImageClassification` model."""
        return self.model.tower

    @property
    def base(self) -> nn.Module:
        """The encoder (`tower.base_model`: `vit`, `deit`, `beit`, `dinov2`, ...)."""
        return self.tower.base_model

    def layer_modules(self) -> nn.ModuleList:
        """The encoder layers, in order."""
        base = self.base
        layers = getattr(base, "layers", None)
        return layers if layers is not None else base.encoder.layer

    def layer(self, index: int) -> HFLayer:
        """Parts of layer `index` (1-based), resolved from the live modules."""
        return hf_layer(self.layer_modules()[index - 1], int(self.tower.config.num_attention_heads), f"layer {index}")

    def attention_heads(self, index: int) -> AttentionHeads:
        """The attention output projection and layer scale of layer `index`. # -> AttentionHeads"""
        parts = self.layer(index)
        return output_heads(parts.out, parts.scale1, parts.num_heads)

    def num_prefix_tokens(self) -> int:
        """CLS (and distillation / register) tokens before the image tokens."""
        return 1

    def input_size(self) -> tuple[int, int]:
        """(H, W) the model is run at: the wrapper's `image_size`, else the config's."""
        size = getattr(self.model, "image_size", None)
        return _pair(size if size is not None else self.tower.config.image_size)

    def grid(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(grid_size, token_cell) from the input size and the patch convolution's stride."""
        conv = self.base.embeddings.patch_embeddings.projection
        stride, kernel, padding = _pair(conv.stride), _pair(conv.kernel_size), _pair(conv.padding)
        if kernel != stride or padding != (0, 0):
            raise UserError(f"patch embedding with kernel {kernel}, stride {stride}, padding {padding}: "
                            "its tokens do not tile the image")
        size = self.input_size()
        if size[0] % stride[0] or size[1] % stride[1]:
            raise UserError(f"input {size} is not a whole number of {stride} patches")
        return (size[0] // stride[0], size[1] // stride[1]), stride

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        for index in range(1, len(self.layer_modules()) + 1):
            self.layer(index)
        self.grid()
        if self.fixed_input_size:
            own = _pair(self.base.embeddings.patch_embeddings.image_size)
            if self.input_size() != own:
                raise UserError(f"{type(self.tower).__name__} runs at its config size {own} only (its forward does "
                                f"not interpolate position embeddings), not at {self.input_size()}")

    def skipped(self) -> tuple[tuple[str, str], ...]:
        """(experiment, reason) pairs that do not apply."""
        return ()

    def describe(self) -> ViTAnatomy:
        grid_size, token_cell = self.grid()
        return ViTAnatomy(
            family=self.family,
            num_blocks=len(self.layer_modules()),
            num_prefix_tokens=self.num_prefix_tokens(),
            has_class_token=True,
            global_pool=self.pool_name,
            embed_dim=int(self.tower.config.hidden_size),
            num_classes=int(self.model.num_classes),
            mlp_width=int(self.value_vectors(1, "mlp").shape[1]) if len(self.layer_modules()) else 0,
            grid_size=grid_size,
            token_cell=token_cell,
            skipped=self.skipped(),
        )

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The model's own embeddings module: patches, CLS (distillation, registers), position
        embeddings (interpolated by the model where it does so), dropout.

        # images: [B, 3, H, W] -> hidden: [B, P+N, d]
        """
        embeddings = self.base.embeddings
        hidden = embeddings(images.to(embeddings.patch_embeddings.projection.weight.dtype))
        return hidden[0] if isinstance(hidden, tuple) else hidden  # earlier BEiT: (embeddings, patch shape)

    def attention_bias(self, index: int) -> torch.Tensor | None:
        """Additive attention-score bias of layer `index` (none here; BEiT's relative positions).

        # -> [1, H, T, T] | None
        """
        return None

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """# resid_pre: [B, T, d] -> BlockTrace"""
        return hf_layer_forward(self.layer(index), index, resid_pre, args, bias=self.attention_bias(index))

    # ---- memories ------------------------------------------------------------------------
    def value_vectors(self, index: int, sublayer: str) -> torch.Tensor:
        """attn: the attention output projection's columns; mlp: the last MLP projection's.

        # -> values: [d, M]
        """
        check_sublayer(sublayer)
        parts = self.layer(index)
        return (parts.out if sublayer == "attn" else parts.mlp_out).weight


# ---- ViT and DeiT ------------------------------------------------------------------------------
class HFViTAdapter(HFAdapter):
    """transformers `ViTForImageClassification`: the CLS token through `layernorm` and `classifier`."""

    family = "hf_vit"
    model_classes = hf_classes("ViTForImageClassification")
    fixed_input_size = True

    def norm_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """# hidden: [..., d] -> [..., d]"""
        return self.base.layernorm(hidden)

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier on the CLS token of the final layernorm (`key_keep` changes nothing here).

        # resid_final: [B, T, d] -> logits: [B, C]
        """
        return self.parity_logits(resid_final)

    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """# resid_final: [B, T, d] -> logits: [B, C] (the CLS token's projection)"""
        return self.project(resid_final[:, 0])


class HFDeiTAdapter(HFViTAdapter):
    """transformers `DeiTForImageClassification` (the CLS head) and
    `DeiTForImageClassificationWithTeacher` (the mean of the CLS and distillation heads)."""

    family = "hf_deit"
    model_classes = hf_classes("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")

    @property
    def teacher(self) -> bool:
        """True for the model with the distillation head."""
        return hasattr(self.tower, "distillation_classifier")

    def num_prefix_tokens(self) -> int:
        return 2  # CLS, distillation

    def class_embedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`classifier`, or the mean of `cls_classifier` and `distillation_classifier` (METHOD §1b)."""
        tower = self.tower
        if not self.teacher:
            return tower.classifier.weight, tower.classifier.bias
        heads = (tower.cls_classifier, tower.distillation_classifier)
        return (heads[0].weight + heads[1].weight) / 2, (heads[0].bias + heads[1].bias) / 2

    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """CLS head: the CLS token's projection; teacher: the mean of `cls_classifier` on the CLS
        token and `distillation_classifier` on the distillation token, as the model computes it.

        # resid_final: [B, T, d] -> logits: [B, C]
        """
        if not self.teacher:
            return self.project(resid_final[:, 0])
        tower, normed = self.tower, self.base.layernorm(resid_final[:, :2])  # [B, 2, d]
        return (tower.cls_classifier(normed[:, 0]) + tower.distillation_classifier(normed[:, 1])) / 2


# ---- DINOv2 -----------------------------------------------------------------------------------
class HFDinov2Adapter(HFAdapter):
    """transformers `Dinov2ForImageClassification` and `Dinov2WithRegistersForImageClassification`:
    the classifier reads concat(CLS, mean of the patch tokens) of the final layernorm."""

    family = "hf_dinov2"
    model_classes = hf_classes("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification")
    pool_name = "token+avg"

    def num_prefix_tokens(self) -> int:
        return 1 + int(getattr(self.tower.config, "num_register_tokens", 0) or 0)  # CLS, registers

    def skipped(self) -> tuple[tuple[str, str], ...]:
        return (("explain", "explainability differentiates the CLS token the head reads; this classifier "
                            "reads the CLS token and the mean of the patch tokens"),)

    def norm_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """# hidden: [..., d] -> [..., d] (the final layernorm; both halves of the classifier read it)"""
        return self.base.layernorm(hidden)

    def class_embedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`W_cls + W_patch`, the classifier's halves summed: `classifier(cat(n, n)) = (W_cls +
        W_patch) n + b` for a token alone (METHOD §1b).

        # -> (E [C, d], e [C])
        """
        classifier, width = self.tower.classifier, int(self.tower.config.hidden_size)
        return classifier.weight[:, :width] + classifier.weight[:, width:], classifier.bias

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier on concat(CLS, mean of the (kept) patch tokens) of the final layernorm.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        prefix = self.num_prefix_tokens()
        normed = self.base.layernorm(resid_final)  # [B, T, d]
        keep = None if key_keep is None else key_keep[:, prefix:]
        patches = pool_tokens(normed[:, prefix:], "avg", keep)  # [B, d]
        return self.tower.classifier(torch.cat([normed[:, 0], patches], dim=-1))

    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """What the classifier reads, as the model computes it. # resid_final: [B, T, d] -> [B, C]"""
        return self.model_logits(resid_final)
