"""The transformers image-classifier adapters (`vitlens/lens/families/hf_vit.py`, `hf_beit.py`) and
loader (`vitlens/models/hf_classifiers.py`) against transformers itself.

Every expectation comes from transformers' own forward: `output_hidden_states` (the residual
stream after every layer), `output_attentions` with `attn_implementation="eager"`, forward hooks on
its modules, its `.logits`, and — for the perturbations — its eager attention made to apply the
same edit: the post-softmax probabilities pass through `torch.nn.functional.dropout` in every
eager path (the unified `eager_attention_forward` and the earlier self-attention modules), so a
patched `dropout` that edits 4-D inputs makes transformers' own modules compute the edited forward.
Tiny configs of each class, every parameter re-drawn (zero relative-position tables, 0.1 layer
scale and 0.02 inits would hide whole branches). `data2vec-vision` keeps transformers' earlier
module layout (`attention.attention.query`, `intermediate.dense`, `encoder.layer`), so both
layouts the adapters read are exercised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")

from vitlens.data.geometry import EvalGeometry  # noqa: E402
from vitlens.errors import UserError  # noqa: E402
from vitlens.explain.gradients import block_head_importance  # noqa: E402
from vitlens.lens import STREAM_RESID, Lens  # noqa: E402
from vitlens.lens.classifiers import HFImageClassifier  # noqa: E402
from vitlens.lens.families import adapter_for  # noqa: E402
from vitlens.lens.parity import check_parity  # noqa: E402
from vitlens.lens.perturb import attention_keep_mask  # noqa: E402
from vitlens.models.hf_classifiers import MODEL_TYPES, load_hf_classifier  # noqa: E402

LAYERS = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_labels=10, attn_implementation="eager")  # 4 x 4 grid
MLP = dict(intermediate_size=64)
DINO = dict(mlp_ratio=2)
#: option -> (config class, model class, config kwargs, family, prefix tokens)
OPTIONS: dict[str, tuple[str, str, dict, str, int]] = {
    "vit": ("ViTConfig", "ViTForImageClassification", {**MLP, "qkv_bias": False}, "hf_vit", 1),
    "deit": ("DeiTConfig", "DeiTForImageClassification", MLP, "hf_deit", 2),
    "deit_teacher": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", MLP, "hf_deit", 2),
    "beit_mean_layer_and_shared_bias": ("BeitConfig", "BeitForImageClassification", {
        **MLP, "use_relative_position_bias": True, "use_shared_relative_position_bias": True,
        "use_absolute_position_embeddings": True}, "hf_beit", 1),
    "beit_cls_no_layer_scale": ("BeitConfig", "BeitForImageClassification", {
        **MLP, "use_mean_pooling": False, "use_relative_position_bias": True, "layer_scale_init_value": 0.0},
        "hf_beit", 1),
    "data2vec_earlier_layout": ("Data2VecVisionConfig", "Data2VecVisionForImageClassification", {
        **MLP, "use_relative_position_bias": True, "use_shared_relative_position_bias": True}, "hf_beit", 1),
    "dinov2": ("Dinov2Config", "Dinov2ForImageClassification", DINO, "hf_dinov2", 1),
    "dinov2_swiglu": ("Dinov2Config", "Dinov2ForImageClassification", {**DINO, "use_swiglu_ffn": True},
                      "hf_dinov2", 1),
    "dinov2_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification",
                         {**DINO, "num_register_tokens": 3}, "hf_dinov2", 4),
}
LABELS = {i: f"class {i}" for i in range(10)}


def redraw(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter re-drawn at a scale where attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            elif "relative_position_bias_table" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1.5)
            elif "lambda" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 0.7 + 0.3)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def tower(option: str, **overrides) -> torch.nn.Module:
    """The transformers model of `option`, re-drawn."""
    config_name, model_name, kwargs, _, _ = OPTIONS[option]
    config = getattr(transformers, config_name)(**{**LAYERS, **kwargs, "id2label": LABELS, **overrides})
    return redraw(getattr(transformers, model_name)(config))


@pytest.fixture(scope="module")
def models() -> dict[str, HFImageClassifier]:
    """One wrapped model per option (built once for the module)."""
    return {option: HFImageClassifier(tower(option)).eval() for option in OPTIONS}


def images(batch: int = 2) -> torch.Tensor:
    """# -> [B, 3, 32, 32]"""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def module_at(root: torch.nn.Module, *paths: str) -> torch.nn.Module:
    """The first dotted path that exists under `root` (one per transformers layout)."""
    for path in paths:
        try:
            return root.get_submodule(path)
        except AttributeError:
            continue
    raise AttributeError(f"none of {paths} under {type(root).__name__}")


def layers_of(model: HFImageClassifier) -> torch.nn.ModuleList:
    base = model.tower.base_model
    return base.layers if hasattr(base, "layers") else base.encoder.layer


def run_tower(model: HFImageClassifier, x: torch.Tensor, **kwargs) -> tuple[object, list[torch.Tensor]]:
    """transformers' own forward and its residual stream: the embeddings (`hidden_states[0]`) and
    every layer's output (forward hooks on its layers: some versions give the last hidden state
    after the final layernorm).

    # x: [B, 3, H, W] -> (output, [embeddings, layer 1 output, ..., layer L output] each [B, T, d])
    """
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
               for layer in layers_of(model)]
    try:
        output = model.tower(pixel_values=x, output_hidden_states=True, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return output, [output.hidden_states[0], *outputs]


def eager_probs_edit(monkeypatch: pytest.MonkeyPatch, edit: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make transformers' eager attention apply `edit` to its post-softmax probabilities (the only
    4-D tensors its dropout sees; hidden-state dropouts see 3-D ones)."""
    dropout = F.dropout

    def patched(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        return edit(x) if x.dim() == 4 else dropout(x, p, training, inplace)

    monkeypatch.setattr(torch.nn.functional, "dropout", patched)


# ---- parity and anatomy ------------------------------------------------------------------
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_parity_and_anatomy(models, option: str) -> None:
    model = models[option]
    result = check_parity(model, images())
    assert result.ok and result.forward_error < 1e-5 and result.projection_error < 1e-5, result
    assert result.logit_scale > 1.0  # the logits are not trivially small
    anatomy = adapter_for(model).anatomy
    family, prefix = OPTIONS[option][3], OPTIONS[option][4]
    assert (anatomy.family, anatomy.num_prefix_tokens, anatomy.num_blocks) == (family, prefix, 2)
    assert anatomy.grid_size == (4, 4) and anatomy.token_cell == (8, 8) and anatomy.num_classes == 10
    assert anatomy.has_class_token and anatomy.embed_dim == 32


def test_skipped_experiments(models) -> None:
    assert adapter_for(models["vit"]).anatomy.skipped == ()
    assert adapter_for(models["beit_cls_no_layer_scale"]).anatomy.skipped == ()
    assert adapter_for(models["beit_mean_layer_and_shared_bias"]).anatomy.skip_reason("explain").endswith(
        "(use_mean_pooling)")
    assert "mean of the patch tokens" in adapter_for(models["dinov2"]).anatomy.skip_reason("explain")


# ---- streams -----------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["vit", "deit_teacher", "beit_mean_layer_and_shared_bias",
                                    "data2vec_earlier_layout", "dinov2_swiglu", "dinov2_registers"])
def test_streams_are_transformers_own(models, option: str) -> None:
    model = models[option]
    adapter, x = adapter_for(model), images()
    seen: dict[str, list[torch.Tensor]] = {"o_in": [], "o_out": [], "fc1": [], "down_in": []}
    handles = []
    for layer in layers_of(model):
        out = module_at(layer, "attention.o_proj", "attention.output.dense")
        handles.append(out.register_forward_pre_hook(lambda m, a: seen["o_in"].append(a[0])))
        handles.append(out.register_forward_hook(lambda m, a, o: seen["o_out"].append(o)))
        gated = module_at(layer, "mlp.down_proj", "mlp.weights_out", "mlp.fc2", "output.dense")
        if "swiglu" in option:
            handles.append(gated.register_forward_pre_hook(lambda m, a: seen["down_in"].append(a[0])))
        else:
            first = module_at(layer, "mlp.fc1", "intermediate.dense")
            handles.append(first.register_forward_hook(lambda m, a, o: seen["fc1"].append(o)))
    with torch.no_grad():
        output, stream = run_tower(model, x, output_attentions=True)
        for handle in handles:
            handle.remove()
        for b in range(len(layers_of(model))):  # output_hidden_states: embeddings and intermediate layers
            assert torch.allclose(stream[b], output.hidden_states[b])
        hidden = adapter.embed(x)
        assert torch.allclose(hidden, stream[0], atol=1e-6)
        for b, trace in enumerate(adapter.iter_block_traces(hidden, need_probs=True)):
            layer = layers_of(model)[b]
            scale = getattr(layer, "lambda_1", None)
            scale = layer.layer_scale1.lambda1 if hasattr(layer, "layer_scale1") else scale
            scale = 1.0 if scale is None else scale
            assert torch.allclose(trace.resid_post, stream[b + 1], atol=1e-5)
            assert torch.allclose(trace.attn_probs, output.attentions[b], atol=1e-6)
            assert torch.allclose(trace.attn_coefficients, seen["o_in"][b], atol=1e-5)
            assert torch.allclose(trace.attn_out, scale * seen["o_out"][b], atol=1e-5)
            coefficients = seen["down_in" if "swiglu" in option else "fc1"][b]
            assert torch.allclose(trace.mlp_coefficients, coefficients, atol=1e-5)
            out = module_at(layer, "attention.o_proj", "attention.output.dense")
            last = module_at(layer, "mlp.down_proj", "mlp.weights_out", "mlp.fc2", "output.dense")
            assert adapter.value_vectors(b + 1, "attn") is out.weight
            assert adapter.value_vectors(b + 1, "mlp") is last.weight
        assert torch.allclose(adapter.model_logits(trace.resid_post), output.logits, atol=1e-5)
        if option == "beit_mean_layer_and_shared_bias":  # the relative position biases matter
            first = layers_of(model)[0]
            normed = first.layernorm_before(hidden)
            q, k = (module_at(first, f"attention.{new}", f"attention.attention.{old}")(normed).view(2, 17, 2, 16)
                    .transpose(1, 2) for new, old in (("q_proj", "query"), ("k_proj", "key")))
            plain = ((q @ k.transpose(-2, -1)) / 4).softmax(-1)
            assert (plain - output.attentions[0]).abs().max() > 1e-2


# ---- projection --------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["vit", "deit_teacher", "beit_mean_layer_and_shared_bias",
                                    "beit_cls_no_layer_scale", "dinov2_registers"])
def test_projection_is_the_models_head_on_a_one_token_sequence(models, option: str) -> None:
    """proj(h) = the model's own final norm, pooling and classifier(s) on a sequence whose every
    token is h (METHOD §1b): the last layer's output replaced by that sequence with a hook."""
    model = models[option]
    adapter = adapter_for(model)
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    sequence = h[:, None].expand(-1, adapter.anatomy.num_tokens, -1)  # [3, T, d]

    def replace(module, args, output):
        return (sequence,) + tuple(output[1:]) if isinstance(output, tuple) else sequence

    handle = layers_of(model)[-1].register_forward_hook(replace)
    with torch.no_grad():
        expected = model(torch.zeros(3, 3, 32, 32))
    handle.remove()
    with torch.no_grad():
        assert torch.allclose(adapter.project(h), expected, atol=1e-5)
        if option == "dinov2_registers":  # the same as classifier(cat(norm h, norm h))
            normed = model.tower.base_model.layernorm(h)
            both = model.tower.classifier(torch.cat([normed, normed], -1))
            assert torch.allclose(adapter.project(h), both, atol=1e-5)
            assert adapter.class_embedding()[0].shape == (10, 32)


def test_lens_run_end_to_end(models) -> None:
    model = models["deit_teacher"]
    x, labels = images(3), torch.tensor([0, 4, 9])
    with torch.no_grad():
        output, stream = run_tower(model, x)
    out = Lens(model).run(x, labels)
    assert out.rank.shape == (3, 3, 3, 18)
    assert torch.equal(out.prediction, output.logits.argmax(-1))
    tower = model.tower
    with torch.no_grad():
        for slot in range(3):
            normed = tower.deit.layernorm(stream[slot])  # [B, T, d]
            logits = (tower.cls_classifier(normed) + tower.distillation_classifier(normed)) / 2
            correct = logits[torch.arange(3), :, labels]
            assert torch.allclose(out.correct_logit[:, slot, STREAM_RESID], correct, atol=1e-4)
    dino = Lens(models["dinov2_registers"]).run(x, labels)  # memories with the summed class embedding
    assert dino.rank.shape == (3, 3, 3, 20) and dino.num_prefix_tokens == 4


# ---- perturbations -----------------------------------------------------------------------
@pytest.mark.parametrize("option, perturbation", [("vit", "self_only"), ("deit", "no_cls"),
                                                  ("beit_mean_layer_and_shared_bias", "self_only"),
                                                  ("data2vec_earlier_layout", "no_cls"),
                                                  ("dinov2_registers", "self_only")])
def test_attention_perturbation_is_transformers_masked_forward(models, monkeypatch, option: str,
                                                                perturbation: str) -> None:
    model = models[option]
    adapter, x = adapter_for(model), images()
    anatomy = adapter.anatomy
    mask = attention_keep_mask(perturbation, anatomy.num_tokens, anatomy.num_prefix_tokens, True)
    with torch.no_grad():
        unperturbed = model(x)
    eager_probs_edit(monkeypatch, lambda probs: probs * mask)
    with torch.no_grad():
        output, stream = run_tower(model, x)
        resid = adapter.embed(x)
        for b, trace in enumerate(adapter.iter_block_traces(resid, keep_mask=mask)):
            assert torch.allclose(trace.resid_post, stream[b + 1], atol=1e-5)
            resid = trace.resid_post
        assert torch.allclose(adapter.model_logits(resid), output.logits, atol=1e-5)
    assert (output.logits - unperturbed).abs().max() > 1e-3  # the mask changed the model
    out = Lens(model).run(x, torch.tensor([2, 5]), attention_perturbation=perturbation)
    assert torch.equal(out.prediction, output.logits.argmax(-1))


@pytest.mark.parametrize("option", ["data2vec_earlier_layout", "dinov2_registers"])
def test_token_removal_is_transformers_attention_over_kept_keys(models, monkeypatch, option: str) -> None:
    model = models[option]
    adapter, x = adapter_for(model), images()
    prefix = adapter.anatomy.num_prefix_tokens
    key_keep = torch.ones(2, adapter.anatomy.num_tokens, dtype=torch.bool)
    key_keep[0, prefix + torch.tensor([0, 5, 6, 15])] = False
    key_keep[1, prefix + 3: prefix + 12] = False

    def remove(probs: torch.Tensor) -> torch.Tensor:  # removed keys get 0, the kept renormalised
        kept = probs * key_keep[:, None, None, :]
        return kept / kept.sum(-1, keepdim=True)

    eager_probs_edit(monkeypatch, remove)
    with torch.no_grad():
        final = run_tower(model, x)[1][-1]  # [B, T, d] the last layer's output
        tower, base = model.tower, model.tower.base_model
        normed = base.layernorm(final)
        means = torch.stack([normed[i, prefix:][key_keep[i, prefix:]].mean(0) for i in range(2)])  # kept only
        if option.startswith("dinov2"):
            expected = tower.classifier(torch.cat([normed[:, 0], means], dim=-1))
        else:
            expected = tower.classifier(base.pooler.layernorm(means))
        got = adapter.model_logits(adapter.run_blocks(adapter.embed(x), key_keep), key_keep)
    assert torch.allclose(got, expected, atol=1e-5)


def test_explain_gradients_are_transformers(models, monkeypatch) -> None:
    """-∂CE(proj(x_cls^b))/∂a_b[cls, t] against transformers' own eager forward with a leaf CLS row."""
    model = models["vit"]
    x, labels = images(), torch.tensor([3, 6])
    importance = block_head_importance(model, x, labels)  # [B, L, H, N]
    assert importance.shape == (2, 2, 2, 16)
    tower = model.tower
    for b in range(2):
        leaves: list[torch.Tensor] = []
        calls = iter(range(2))

        def leaf_row(probs: torch.Tensor) -> torch.Tensor:
            if next(calls) != b:
                return probs.detach()
            row = probs[:, :, 0].detach().clone().requires_grad_(True)
            leaves.append(row)
            return torch.cat([row[:, :, None], probs[:, :, 1:].detach()], dim=2)

        with monkeypatch.context() as patch:
            eager_probs_edit(patch, leaf_row)
            stream = run_tower(model, x)[1]
        cls = stream[b + 1][:, 0]  # the residual stream after layer b+1, CLS token
        loss = F.cross_entropy(tower.classifier(tower.vit.layernorm(cls)), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, leaves[0])
        assert torch.allclose(importance[:, b], -grad[:, :, 1:], atol=1e-5)
        assert grad.abs().max() > 1e-4


# ---- refusals ------------------------------------------------------------------------------
def test_refusals() -> None:
    with pytest.raises(UserError, match="wrap it in vitlens.lens.classifiers.HFImageClassifier"):
        adapter_for(tower("vit"))
    with pytest.raises(UserError, match="headless"):
        adapter_for(HFImageClassifier(tower("vit", num_labels=0, id2label=None)))
    wrapped = HFImageClassifier(tower("vit"))
    wrapped.image_size = (48, 48)
    with pytest.raises(UserError, match=r"runs at its config size \(32, 32\) only"):
        adapter_for(wrapped)


# ---- the loader ----------------------------------------------------------------------------
def odd_images() -> list[Image.Image]:
    """PIL images of odd sizes with some structure (smooth noise)."""
    rng = np.random.default_rng(0)
    out = []
    for height, width in [(45, 61), (61, 45), (33, 33), (97, 40), (301, 222)]:
        coarse = rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, 3), dtype=np.uint8)
        out.append(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    return out


#: option -> (image processor class, its settings) saved next to the model
SAVED = {
    "deit_teacher": ("DeiTImageProcessor", dict(size={"height": 37, "width": 37},
                                                crop_size={"height": 32, "width": 32})),
    "beit_mean_layer_and_shared_bias": ("BeitImageProcessor", dict(size={"height": 32, "width": 32},
                                                                   do_center_crop=False)),
    "dinov2_registers": ("BitImageProcessor", dict(size={"shortest_edge": 37}, crop_size={"height": 32, "width": 32},
                                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
}


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory) -> dict[str, Path]:
    """`save_pretrained` folders (model + the processor's own preprocessor_config.json)."""
    folders = {}
    for option, (processor, kwargs) in SAVED.items():
        folder = tmp_path_factory.mktemp(option)
        models[option].tower.save_pretrained(folder)
        getattr(transformers, processor)(**kwargs).save_pretrained(folder)
        folders[option] = folder
    return folders


@pytest.mark.parametrize("option", sorted(SAVED))
def test_load_saved_folder(models, saved, option: str) -> None:
    folder = saved[option]
    loaded = load_hf_classifier(str(folder))
    x = images()
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), models[option](x), atol=1e-5)
    assert loaded.class_names == [f"class {i}" for i in range(10)]
    assert "\n" not in loaded.description and type(models[option].tower).__name__ in loaded.description
    assert check_parity(loaded.model, x).ok
    # the data config reproduces the processor's own pixel_values
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    geometry = EvalGeometry.from_data_config(loaded.data_config)
    assert loaded.data_config["input_size"] == (3, 32, 32)
    std = min(loaded.data_config["std"])
    for image in odd_images():
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        # transformers' torchvision backend resizes uint8 tensors: at most one intensity level off PIL's
        assert (geometry.image(image) - theirs).abs().max() <= 1.0001 / 255 / std
        pil = getattr(transformers, type(processor).__name__ + "Pil", None)
        if pil is not None:  # the PIL backend of the same settings: exact
            exact = pil.from_pretrained(folder)(images=image, return_tensors="pt")["pixel_values"][0]
            assert torch.equal(geometry.image(image), exact)


def test_shortest_edge_crop_starts_where_transformers_starts_it() -> None:
    """transformers' centre crop starts at int((size - crop) / 2), torchvision's (EvalGeometry's
    default) rounds half to even: a 39 x 37 image (shortest edge 37, crop 32) starts at row 3 in
    transformers and would start at row 4 with timm's offsets. The loaders' data config asks
    for transformers' offset (`crop_offset = "floor"`), and the pixels are then the same."""
    from vitlens.models.hf_classifiers import processor_data_config

    pil = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor  # earlier: PIL
    processor = pil(size={"shortest_edge": 37}, crop_size={"height": 32, "width": 32})
    config = processor_data_config(processor)
    image = odd_images()[0].resize((37, 39))
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]  # rows 3..34
    assert torch.equal(EvalGeometry.from_data_config(config).image(image), theirs)
    rounded = EvalGeometry.from_data_config({**config, "crop_offset": "round"}).image(image)  # rows 4..35
    assert torch.equal(rounded[:, :-1], theirs[:, 1:]) and not torch.equal(rounded, theirs)


def test_random_twin_and_meta(saved) -> None:
    folder = str(saved["dinov2_registers"])
    first, second = (load_hf_classifier(folder, random_seed=3) for _ in range(2))
    pretrained = load_hf_classifier(folder)
    x = images()
    with torch.no_grad():
        assert torch.equal(first.model(x), second.model(x))
        assert not torch.allclose(first.model(x), pretrained.model(x))
    assert "random weights (seed 3)" in first.description
    assert type(first.model.tower) is type(pretrained.model.tower)
    meta = load_hf_classifier(folder, meta=True)
    assert all(p.device.type == "meta" for p in meta.model.parameters())
    anatomy = adapter_for(meta.model).anatomy  # checked and described without weights
    assert anatomy.num_prefix_tokens == 4 and anatomy.grid_size == (4, 4)
    teacher = load_hf_classifier(str(saved["deit_teacher"]), random_seed=0)
    assert type(teacher.model.tower).__name__ == "DeiTForImageClassificationWithTeacher"


def test_dinov2_runs_at_its_processor_size(tmp_path) -> None:
    """DINOv2 checkpoints keep a larger config image_size than their processor's crop: the grid is
    the processor's, the position embeddings the model's own interpolation."""
    model = tower("dinov2", image_size=64)
    model.save_pretrained(tmp_path)
    processor = transformers.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    loaded = load_hf_classifier(str(tmp_path))
    anatomy = adapter_for(loaded.model).anatomy
    assert loaded.data_config["input_size"] == (3, 32, 32) and anatomy.grid_size == (4, 4)
    assert check_parity(loaded.model, images()).ok


def test_loader_refusals(tmp_path) -> None:
    swin = transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2, num_labels=3))
    swin.save_pretrained(tmp_path / "swin")
    with pytest.raises(UserError, match="'swin' is not supported: hierarchical") as err:
        load_hf_classifier(str(tmp_path / "swin"))
    assert "\n" not in str(err.value)
    transformers.ConvNextConfig(num_labels=3).save_pretrained(tmp_path / "convnext")
    with pytest.raises(UserError, match=f"'convnext' is not supported \\(supported: {', '.join(MODEL_TYPES)}\\)"):
        load_hf_classifier(str(tmp_path / "convnext"))
    transformers.ViTModel(transformers.ViTConfig(**{**LAYERS, **MLP})).save_pretrained(tmp_path / "headless")
    with pytest.raises(UserError, match="ViTModel has no image classification head"):
        load_hf_classifier(str(tmp_path / "headless"))
    tower("vit").save_pretrained(tmp_path / "no_processor")
    with pytest.raises(UserError, match="cannot load the image processor of"):
        load_hf_classifier(str(tmp_path / "no_processor"))
    processor = transformers.ViTImageProcessor(size={"shortest_edge": 32}, do_center_crop=False)
    processor.save_pretrained(tmp_path / "no_processor")
    with pytest.raises(UserError, match="resizes with {'shortest_edge': 32} and no centre crop"):
        load_hf_classifier(str(tmp_path / "no_processor"))
    with pytest.raises(UserError, match="cannot load the config of"):
        load_hf_classifier(str(tmp_path / "missing"))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_head_attribution_is_exact(models, option: str) -> None:
    """METHOD §3b on every transformers layout: the heads (and their sources) sum to the
    attention stream's linearised logit, and zeroing a head at the output projection's input
    changes it by that head's DLA."""
    from tests.family_checks import assert_head_attribution_is_exact

    model = models[option]
    adapter = adapter_for(model)
    assert_head_attribution_is_exact(adapter, images(), torch.tensor([2, 9]),
                                     out_projection=lambda b: adapter.layer(b).out)
