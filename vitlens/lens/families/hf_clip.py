"""Hugging Face transformers `CLIPModel` and `SiglipModel`: contrastive image towers whose class
space comes from text (METHOD §1c).

The model is wrapped once (`vitlens.models.hf_zeroshot`) in a `ZeroShotClassifier` whose
`tower` is the `CLIPModel` / `SiglipModel` itself (never modified) and whose `features` is the
library's `get_image_features(...).pooler_output`; a class space (a zero-shot head file) gives
`logits = head(n(features(x)))` = `s · n(features) · Eᵀ (+ b)`.

The lens runs the vision tower's own submodules: `vision_model.embeddings` (patch conv, CLIP's
class embedding, absolute position embedding; CLIP then `pre_layrnorm`), then every
`CLIPEncoderLayer` / `SiglipEncoderLayer` as `layer_norm1` → attention recomputed from
`q_proj` / `k_proj` / `v_proj` with `vitlens.lens.attention.attend` → `out_proj` → residual,
`layer_norm2` → `mlp.fc1` → activation → `mlp.fc2` → residual (HF's order). Memory
coefficients: the `out_proj` input (attention) and the `fc1` output before the activation
(MLP); value vectors: the columns of `out_proj.weight` and `fc2.weight` (METHOD §3), for CLIP
mapped through `visual_projection.weight` into the class embedding's width d' (as the open_clip
adapter maps through `proj`; SigLIP's embedding keeps the width d, and its columns are used as
they are, as timm's `map`-pooled ViTs do).

Projection (METHOD §1b/§1c), one token `h` alone through the tower's own pooling path:
- CLIP pools the CLS token: `n(visual_projection(post_layernorm(h)))`, then the class space.
- SigLIP has no CLS token and pools every token with its attention-pooling head
  (`vision_model.head`, a `SiglipMultiheadAttentionPoolingHead`) after `post_layernorm`: a
  token is projected as a one-token sequence through that head, `n(head(post_layernorm([h])))`.
  Token removal pools over the kept tokens only (the head's own attention, removed keys masked).

Skipped: SigLIP `attn_no_cls` (no CLS token) and `explain` (the head reads no CLS token; it
pools with attention). Refused with a reason: other layer / attention / MLP classes, a patch
embedding that is not one non-overlapping conv, SigLIP without its pooling head
(`vision_use_head=False`), an image size that is not a whole number of patches, and a wrapper
that is not a `ZeroShotClassifier`.

Not covered: `Siglip2Model` (NaFlex: patchified pixels with per-image `spatial_shapes` and an
aspect-ratio-keeping processor, no fixed token grid). The fixed-resolution SigLIP 2 checkpoints
on the hub (`google/siglip2-*-patch16-224` ...) are `model_type = "siglip"`, i.e. `SiglipModel`,
and are covered here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitlens.errors import UserError
from vitlens.lens.attention import merge_heads
from vitlens.lens.classifiers import ZeroShotClassifier
from vitlens.lens.families.attention_heads import AttentionHeads, output_heads
from vitlens.lens.families.base import AttentionArgs, ModelAdapter, ViTAnatomy, check_sublayer
from vitlens.lens.linearise import unit_length
from vitlens.lens.trace import BlockTrace

try:
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPMLP, CLIPModel
    from transformers.models.siglip.modeling_siglip import (
        SiglipAttention,
        SiglipEncoderLayer,
        SiglipMLP,
        SiglipModel,
        SiglipMultiheadAttentionPoolingHead,
    )
except ImportError:  # the optional 'hf' extra: no transformers, no HF families
    CLIPModel = SiglipModel = None  # type: ignore[assignment,misc]

#: patch-conv paddings that add nothing (CLIP: (0, 0); SigLIP: "valid")
NO_PADDING = ((0, 0), "valid")


def layer_forward(layer: torch.nn.Module, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
    """One `CLIPEncoderLayer` / `SiglipEncoderLayer` from its own submodules, in HF's order,
    attention probabilities formed by `attend` (keep mask, removed keys, edits).

    # resid_pre: [B, T, d], keep_mask: [T, T], key_keep: [B, T] bool -> BlockTrace
    """
    attn, mlp = layer.self_attn, layer.mlp
    x = layer.layer_norm1(resid_pre)
    batch, tokens, _ = x.shape
    heads = (batch, tokens, attn.num_heads, attn.head_dim)
    q, k, v = (proj(x).view(heads).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    heads_out, probs = args.attend(q, k, v, attn.scale)
    attn_coefficients = merge_heads(heads_out)  # [B, T, d]
    attn_out = attn.out_proj(attn_coefficients)
    resid_mid = resid_pre + attn_out
    mlp_coefficients = mlp.fc1(layer.layer_norm2(resid_mid))  # [B, T, M] before the activation
    mlp_out = mlp.fc2(mlp.activation_fn(mlp_coefficients))
    return BlockTrace(
        index=index, resid_pre=resid_pre, attn_out=attn_out, resid_mid=resid_mid, mlp_out=mlp_out,
        resid_post=resid_mid + mlp_out, attn_coefficients=attn_coefficients,
        mlp_coefficients=mlp_coefficients, attn_probs=probs, attn_values=v,
    )


class _HFContrastiveAdapter(ModelAdapter):
    """What `CLIPModel` and `SiglipModel` share: embeddings, encoder layers, memories."""

    model: ZeroShotClassifier
    #: the encoder layer / attention / MLP classes of the family (exact types)
    layer_types: tuple[type, type, type] = ()  # type: ignore[assignment]
    has_class_token: bool = False
    global_pool: str = ""

    def final_norms(self) -> list[tuple[str, torch.nn.Module]]:
        """`post_layernorm` (the L2 normalisation of METHOD §1c stays live)."""
        return [("vision_model.post_layernorm", self.vision.post_layernorm)]

    @property
    def vision(self) -> torch.nn.Module:
        """The tower's `vision_model` (`CLIPVisionModel` / `SiglipVisionModel`)."""
        return self.model.tower.vision_model

    # ---- anatomy -------------------------------------------------------------------------
    def check(self) -> None:
        if not isinstance(self.model, ZeroShotClassifier):
            raise UserError(f"{type(self.model.tower).__name__} is analysed as a zero-shot tower "
                            f"(ZeroShotClassifier), not as a {type(self.model).__name__}")
        conv = self.vision.embeddings.patch_embedding
        if not (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == conv.stride
                and conv.padding in NO_PADDING and conv.dilation == (1, 1) and conv.groups == 1):
            raise UserError("the patch embedding is not one non-overlapping convolution "
                            f"(kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding})")
        image = int(self.vision.embeddings.image_size)
        if any(image % side for side in conv.stride):
            raise UserError(f"input ({image}, {image}) is not a whole number of {tuple(conv.stride)} patches")
        layer_type, attn_type, mlp_type = self.layer_types
        for index, layer in enumerate(self.vision.encoder.layers, start=1):
            where = f"block {index}"
            if type(layer) is not layer_type:
                raise UserError(f"{where}: unsupported encoder layer {type(layer).__name__} "
                                f"(supported: {layer_type.__name__})")
            if type(layer.self_attn) is not attn_type:
                raise UserError(f"{where}: unsupported attention {type(layer.self_attn).__name__} "
                                f"(supported: {attn_type.__name__})")
            if type(layer.mlp) is not mlp_type:
                raise UserError(f"{where}: unsupported MLP {type(layer.mlp).__name__} (supported: {mlp_type.__name__})")

    def describe(self) -> ViTAnatomy:
        vision = self.vision
        stride = tuple(int(s) for s in vision.embeddings.patch_embedding.stride)
        image = int(vision.embeddings.image_size)
        layers = vision.encoder.layers
        return ViTAnatomy(
            family=self.family,
            num_blocks=len(layers),
            num_prefix_tokens=int(self.has_class_token),
            has_class_token=self.has_class_token,
            global_pool=self.global_pool,
            embed_dim=int(vision.config.hidden_size),
            num_classes=int(self.model.num_classes),
            mlp_width=int(layers[0].mlp.fc1.out_features) if len(layers) else 0,
            grid_size=(image // stride[0], image // stride[1]),
            token_cell=(stride[0], stride[1]),
            skipped=self._skipped(),
        )

    def _skipped(self) -> tuple[tuple[str, str], ...]:
        return ()

    # ---- forward -------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The vision embeddings module's own output (patch conv, CLS, position embedding).

        # images: [B, 3, H, W] -> hidden: [B, P+N, d]
        """
        image = int(self.vision.embeddings.image_size)
        if tuple(images.shape[-2:]) != (image, image):
            raise UserError(f"images of {tuple(images.shape[-2:])} pixels: {type(self.model.tower).__name__} reads "
                            f"({image}, {image}) (the token grid the lens describes)")
        return self.vision.embeddings(images)

    def trace_block(self, index: int, resid_pre: torch.Tensor, args: AttentionArgs) -> BlockTrace:
        """# resid_pre: [B, T, d] -> BlockTrace"""
        return layer_forward(self.vision.encoder.layers[index - 1], index, resid_pre, args)

    def run_blocks(self, hidden: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The library's own encoder (no streams kept; token removal as key masking).

        # hidden: [B, T0, d], key_keep: [B, T] bool -> resid_final: [B, T, d]
        """
        if key_keep is None:
            return self.vision.encoder(inputs_embeds=hidden).last_hidden_state
        return super().run_blocks(hidden, key_keep)

    def logits_keeping(self, hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The position embeddings are already in `hidden`: the prefix and the kept image tokens
        are gathered into a shorter sequence and run through the library's own encoder.

        # hidden: [B, T, d], kept: [B, n] sorted positions -> logits: [B, C]
        """
        prefix = int(self.has_class_token)
        image_tokens = hidden.gather(1, kept[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, n, d]
        sequence = torch.cat([hidden[:, :prefix], image_tokens], dim=1)  # [B, P+n, d]
        return self.model_logits(self.run_blocks(sequence))

    def attention_heads(self, index: int) -> AttentionHeads:
        """`self_attn.out_proj` of layer `index` (no layer scale). # -> AttentionHeads"""
        attn = self.vision.encoder.layers[index - 1].self_attn
        return output_heads(attn.out_proj, None, attn.num_heads)

    # ---- memories ------------------------------------------------------------------------
    def value_vectors(self, index: int, sublayer: str) -> torch.Tensor:
        """attn: `out_proj`'s columns; mlp: `fc2`'s columns, in the class embedding's space
        (`to_feature_space`). # -> values: [d', M]"""
        check_sublayer(sublayer)
        layer = self.vision.encoder.layers[index - 1]
        return self.to_feature_space(layer.self_attn.out_proj.weight if sublayer == "attn" else layer.mlp.fc2.weight)

    def to_feature_space(self, values: torch.Tensor) -> torch.Tensor:
        """Residual-space columns in the class embedding's space: the linear part of the
        one-token head path (weights only). # values: [d, M] -> [d', M]"""
        return values


class HFClipAdapter(_HFContrastiveAdapter):
    """transformers `CLIPModel`: CLS token, `pre_layrnorm`, CLS pooling, `visual_projection`."""

    family = "hf_clip"
    model_classes = (CLIPModel,) if CLIPModel is not None else ()
    if CLIPModel is not None:
        layer_types = (CLIPEncoderLayer, CLIPAttention, CLIPMLP)
    has_class_token = True
    global_pool = "token"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`pre_layrnorm(embeddings(images))`, as `CLIPVisionModel.forward` does.

        # images: [B, 3, H, W] -> hidden: [B, 1+N, d]
        """
        return self.vision.pre_layrnorm(super().embed(images))

    def norm_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """`n(visual_projection(post_layernorm(h)))`: the CLS pooling path on one token.

        # hidden: [..., d] -> [..., d']
        """
        return unit_length(self.model.tower.visual_projection(self.vision.post_layernorm(hidden)))

    def to_feature_space(self, values: torch.Tensor) -> torch.Tensor:
        """`visual_projection.weight @ values` (as open_clip's adapter maps through `proj`), so
        `E · W` has the class embedding's width. # values: [d, M] -> [d', M]"""
        return self.model.tower.visual_projection.weight @ values

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The CLS token through `post_layernorm`, `visual_projection`, L2 norm and the class
        space (removed tokens do not change what the CLS pooling reads).

        # resid_final: [B, T, d] -> logits: [B, C]
        """
        return self.project(resid_final[:, 0])

    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """The projection of the CLS token. # resid_final: [B, T, d] -> logits: [B, C]"""
        return self.project(resid_final[:, 0])


class HFSiglipAdapter(_HFContrastiveAdapter):
    """transformers `SiglipModel`: no CLS token; `post_layernorm` then the attention-pooling head."""

    family = "hf_siglip"
    model_classes = (SiglipModel,) if SiglipModel is not None else ()
    if SiglipModel is not None:
        layer_types = (SiglipEncoderLayer, SiglipAttention, SiglipMLP)
    has_class_token = False
    global_pool = "map"

    def check(self) -> None:
        super().check()
        head = getattr(self.vision, "head", None)
        if not self.vision.use_head or type(head) is not SiglipMultiheadAttentionPoolingHead:
            raise UserError("the SigLIP vision tower has no attention-pooling head (vision_use_head=False): "
                            "it gives no image embedding to project onto the class space")

    def _skipped(self) -> tuple[tuple[str, str], ...]:
        return (("attn_no_cls", "the model has no CLS token"),
                ("explain", "explainability differentiates the CLS token the head reads; this model pools "
                            "with its attention-pooling head (global_pool='map')"))

    def norm_final(self, hidden: torch.Tensor) -> torch.Tensor:
        """`n(head(post_layernorm([h])))`: the attention pool on the one-token sequence.

        # hidden: [..., d] -> [..., d']
        """
        normed = self.vision.post_layernorm(hidden)
        pooled = self.vision.head(normed.reshape(-1, 1, normed.shape[-1]))  # [n, 1, d] -> [n, d']
        return unit_length(pooled.reshape(*normed.shape[:-1], pooled.shape[-1]))

    def pool(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The attention-pooling head over `tokens` (after `post_layernorm`), over the kept ones
        only: the head's own modules, the removed keys masked out of its attention.

        # tokens: [B, T, d], keep: [B, T] bool -> pooled: [B, d']
        """
        head = self.vision.head
        if keep is None:
            return head(tokens)
        probe = head.probe.repeat(tokens.shape[0], 1, 1)  # [B, 1, d]
        pooled = head.attention(probe, tokens, tokens, key_padding_mask=~keep, need_weights=False)[0]
        return (pooled + head.mlp(head.layernorm(pooled)))[:, 0]

    def model_logits(self, resid_final: torch.Tensor, key_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`post_layernorm` → the attention pool (over the kept tokens) → L2 norm → class space.

        # resid_final: [B, T, d], key_keep: [B, T] bool -> logits: [B, C]
        """
        pooled = self.pool(self.vision.post_layernorm(resid_final), key_keep)
        return self.model.head(F.normalize(pooled, dim=-1))

    def parity_logits(self, resid_final: torch.Tensor) -> torch.Tensor:
        """What the attention pool reads (every token) through the rest of the head path.

        # resid_final: [B, T, d] -> logits: [B, C]
        """
        return self.model_logits(resid_final)
