"""Export a VLM to transformers' own ``LlavaForConditionalGeneration``: a folder that loads without mmlm.

What maps (anything else is refused, the part named):

* vision: a timm ``VisionTransformer`` with one class token, pre-norm blocks, LayerNorm, exact GELU, fused
  qkv with bias, no layer scale / qk-norm / registers / pre-norm stem -> transformers' ``ViTModel`` (same
  maths; the weights are re-laid out). timm towers through ``TimmWrapper`` cannot carry the tokens: Llava reads
  ``hidden_states`` and TimmWrapper takes them from ``forward_intermediates`` in its default NCHW layout.
* features: a block's raw output (``vision.feature_layer: k``, LLaVA's -2 or any other; the export keeps the
  blocks up to it and Llava reads its last ``hidden_states`` entry), the class token dropped
  (``vision_feature_select_strategy='default'``) or kept (``'full'``, ``keep_prefix_tokens: true``). The normed
  last layer (``feature_layer: null``) does not map: Llava reads ``hidden_states``, never the final LayerNorm.
* projector: ``mlp`` with hidden width = the LM's (Llava's linear_1 / gelu / linear_2), or ``linear``
  (linear_1 = it, identity activation, linear_2 = identity). No ``pos_embed_2d`` (Llava has no slot for it).
* language model: any causal LM transformers builds (its base model and output head are copied as they are).

The processor is ``LlavaProcessor``: timm's eval transform through ``TimmWrapperImageProcessor`` (the resize
mode maps to timm's crop modes) and the VLM's tokenizer, which gets a post-processor that prepends the start
token mmlm puts first. Prompts are written with the image marker: ``"<image>" + prompt``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

CROP_MODES = {"pad": "border", "squash": "squash", "crop": "center"}


class ExportError(ValueError):
    """A part of the model has no equivalent in the export target."""


@dataclasses.dataclass
class LlavaPlan:
    vision_layers: int  # ViT blocks in the export (up to the chosen one)
    feature_layer: int  # Llava's vision_feature_layer
    strategy: str  # Llava's vision_feature_select_strategy
    projector_act: str  # Llava's projector_hidden_act


def plan_llava(vlm) -> LlavaPlan:
    """How ``vlm`` maps onto Llava; ExportError naming the first part that does not."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import VisionTransformer

    vision, config = vlm.vision, vlm.config.vision
    backbone = vision.backbone
    if vision.pos_embed is not None:
        raise ExportError("vision.pos_embed_2d: Llava adds no position embedding to the image tokens; "
                          "use vision.pos_embed_2d=false")
    if vision.colour_stream is not None:
        raise ExportError("vision.colour_stream: Llava has no colour stream beside its tower; "
                          "use vision.colour_stream=false")
    if not isinstance(backbone, VisionTransformer):
        raise ExportError(f"vision '{config.name}' ({type(backbone).__name__}): only timm VisionTransformer towers "
                          "map to Llava (transformers' ViTModel); TimmWrapper gives Llava NCHW feature maps, not tokens")
    if config.features_only_stage is not None:
        raise ExportError("vision.features_only_stage: a CNN stage has no Llava equivalent; use a ViT tower")
    problems = []
    if getattr(backbone, "cls_token", None) is None or backbone.num_prefix_tokens != 1:
        problems.append(f"{backbone.num_prefix_tokens} prefix tokens (ViTModel has exactly one class token)")
    if getattr(backbone, "no_embed_class", False):
        problems.append("no_embed_class")
    if not isinstance(backbone.norm_pre, nn.Identity):
        problems.append("a pre-norm stem (norm_pre)")
    for i, block in enumerate(backbone.blocks):
        attn = block.attn
        if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
            problems.append(f"layer scale in block {i}")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            problems.append(f"qk-norm in block {i}")
        if attn.qkv.bias is None:
            problems.append(f"qkv without bias in block {i}")
        if not isinstance(block.mlp, Mlp) or not (isinstance(block.mlp.act, nn.GELU)
                                                   and block.mlp.act.approximate == "none"):
            problems.append(f"an MLP other than Linear-GELU-Linear in block {i}")
        if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
            problems.append(f"a norm other than LayerNorm in block {i}")
    if problems:
        raise ExportError(f"vision '{config.name}': {'; '.join(sorted(set(problems)))}: no transformers ViTModel "
                          "equivalent")
    if config.feature_layer is None:
        raise ExportError("vision.feature_layer=null (the normed last layer): Llava feeds a block's raw output to "
                          "its projector; use vision.feature_layer=-1 (last block) or -2 (as LLaVA)")
    layers, feature_layer = vision._take_index + 1, -1
    strategy = "full" if config.keep_prefix_tokens else "default"

    projector = vlm.projector
    lm_dim = vlm.language_model.get_input_embeddings().embedding_dim
    ptype = vlm.config.projector.type
    if ptype == "linear":
        act = "linear"
    elif ptype == "mlp":
        first, gelu, _ = projector.net
        if first.out_features != lm_dim:
            raise ExportError(f"projector.hidden_dim={first.out_features}: Llava's projector is as wide as the LM "
                              f"({lm_dim}); use projector.hidden_dim=null")
        if gelu.approximate != "none":
            raise ExportError("projector: tanh-approximated GELU; Llava's 'gelu' is exact")
        act = "gelu"
    else:
        raise ExportError(f"{ptype} projector: no Llava equivalent; use projector.type=mlp")
    return LlavaPlan(layers, feature_layer, strategy, act)


def _vit_config(vlm, plan: LlavaPlan):
    from transformers import ViTConfig

    backbone = vlm.vision.backbone
    block = backbone.blocks[0]
    size = vlm.vision.data_config["input_size"]
    patch = backbone.patch_embed.patch_size
    if size[1] != size[2] or patch[0] != patch[1]:
        raise ExportError(f"vision: input {size[1]}x{size[2]} with patch {patch}: ViTModel takes square images "
                          "and patches")
    return ViTConfig(hidden_size=backbone.embed_dim, num_hidden_layers=plan.vision_layers,
                     num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.fc1.out_features,
                     hidden_act="gelu", layer_norm_eps=block.norm1.eps, image_size=size[1], patch_size=patch[0],
                     num_channels=size[0], qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _vit_state(backbone) -> dict[str, torch.Tensor]:
    """timm ViT weights (blocks up to the feature layer) in transformers ViTModel names, the fused qkv split."""
    state = {"embeddings.cls_token": backbone.cls_token, "embeddings.position_embeddings": backbone.pos_embed,
             "embeddings.patch_embeddings.projection.weight": backbone.patch_embed.proj.weight,
             "embeddings.patch_embeddings.projection.bias": backbone.patch_embed.proj.bias}
    for i, block in enumerate(backbone.blocks):
        p = f"layers.{i}."
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), block.attn.qkv.weight.chunk(3),
                              block.attn.qkv.bias.chunk(3)):
            state[p + f"attention.{name}.weight"], state[p + f"attention.{name}.bias"] = w, b
        pairs = {"attention.o_proj": block.attn.proj, "layernorm_before": block.norm1,
                 "layernorm_after": block.norm2, "mlp.fc1": block.mlp.fc1, "mlp.fc2": block.mlp.fc2}
        for name, module in pairs.items():
            state[p + name + ".weight"], state[p + name + ".bias"] = module.weight, module.bias
    return {k: v.detach().clone() for k, v in state.items()}


def _tokenizer_with_start(tokenizer):
    """A copy of ``tokenizer`` whose ``tokenizer(text)`` starts with mmlm's start token (BOS, else EOS)."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(tokenizer)
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    start = tokenizer.convert_ids_to_tokens(start_id)
    probe = tokenizer("a")["input_ids"]
    if probe[:1] != [start_id] or probe.count(start_id) != 1:
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=f"{start} $A",
                                                                        special_tokens=[(start, start_id)])
    return tokenizer


def build_llava(vlm):
    """(LlavaForConditionalGeneration, LlavaProcessor) holding ``vlm``'s weights; ExportError when it cannot."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.timm_wrapper import TimmWrapperImageProcessor

    from mmlm.models.language import IMAGE_TOKEN, base_causal_lm, is_lora

    if is_lora(vlm.language_model):
        raise ExportError("language: a LoRA adapter; save the model (merges it) and export the saved folder")
    plan = plan_llava(vlm)
    lm = base_causal_lm(vlm.language_model)
    config = LlavaConfig(vision_config=_vit_config(vlm, plan), text_config=copy.deepcopy(lm.config),
                         image_token_id=vlm.image_token_id, image_seq_length=vlm.num_image_tokens,
                         vision_feature_layer=plan.feature_layer, vision_feature_select_strategy=plan.strategy,
                         projector_hidden_act=plan.projector_act, multimodal_projector_bias=True,
                         tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    llava = LlavaForConditionalGeneration(config).eval()
    vit_state = _vit_state(vlm.vision.backbone)
    tower = llava.model.vision_tower
    unused = set(tower.state_dict()) - set(vit_state)  # the final LayerNorm and pooler: never read by Llava
    if unused - {"layernorm.weight", "layernorm.bias", "pooler.dense.weight", "pooler.dense.bias"}:
        raise ExportError(f"vision: no timm weights for {sorted(unused)}")
    with torch.no_grad():
        for name in unused:
            tower.get_parameter(name).fill_(1.0 if name == "layernorm.weight" else 0.0)
        tower.load_state_dict(vit_state, strict=False)
        proj = llava.model.multi_modal_projector
        if plan.projector_act == "linear":
            proj.linear_1.load_state_dict(vlm.projector.state_dict())
            proj.linear_2.weight.copy_(torch.eye(proj.linear_2.out_features))
            proj.linear_2.bias.zero_()
        else:
            proj.linear_1.load_state_dict(vlm.projector.net[0].state_dict())
            proj.linear_2.load_state_dict(vlm.projector.net[2].state_dict())
        llava.model.language_model.load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
        llava.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    llava.generation_config.eos_token_id = vlm.eos_token_id
    llava.generation_config.pad_token_id = vlm.pad_token_id
    data = dict(vlm.vision.data_config)
    data["crop_mode"] = CROP_MODES[vlm.config.vision.resize]
    image_processor = TimmWrapperImageProcessor(pretrained_cfg={k: list(v) if isinstance(v, tuple) else v
                                                                for k, v in data.items()})
    patch = vlm.vision.backbone.patch_embed.patch_size[0]
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer_with_start(vlm.tokenizer),
                               patch_size=patch, vision_feature_select_strategy=plan.strategy,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    return llava, processor


def export_llava(model, out: str | Path) -> Path:
    """Write ``out``: a Llava folder (model + processor) from a VisionLanguageModel or a saved mmlm folder."""
    from mmlm.models.vlm import VisionLanguageModel

    vlm = model if isinstance(model, VisionLanguageModel) else VisionLanguageModel.from_pretrained(model)
    vlm.eval()
    llava, processor = build_llava(vlm)
    out = Path(out)
    llava.save_pretrained(out)
    processor.save_pretrained(out)
    _fix_timm_processor_config(out / "processor_config.json")
    return out


def _fix_timm_processor_config(path: Path) -> None:
    """TimmWrapperImageProcessor saves ``data_config`` but is rebuilt from ``pretrained_cfg``: write both."""
    data = json.loads(path.read_text(encoding="utf-8"))
    image = data["image_processor"]
    image.setdefault("pretrained_cfg", image["data_config"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
