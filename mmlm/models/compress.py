"""Weight quantisation of a VisionLanguageModel or a generator's denoiser for CPU serving, saved so
``mmlm.load`` runs it.

PyTorch's own kernels do the work (``torch.ao``; fbgemm/x86 on CPU): every ``nn.Linear`` of the LM,
the projector and the vision tower (a ViT's blocks; a CNN has none and stays fp32) becomes a
dynamically quantised int8 Linear (per-channel int8 weights, activations quantised on the fly),
and the LM's token embedding becomes an int8 (per-row) quantised embedding. A tied LM head stays one
matrix on disk: the head is quantised, and the embedding is rebuilt from the head's int8 values (when
quantising and when loading), so the vocabulary matrix is stored once.

No int4: torchao 0.18 (checked with torch 2.14.1) has int4 weight-only kernels for CUDA, XPU and NPU only
(PLAIN/PRESHUFFLED need mslk, TILE_PACKED_TO_4D CUDA, PLAIN_INT32 XPU/NPU; the CPU "opaque" layout is
gone); its CPU ``IntxWeightOnlyConfig(int4)`` keeps int4 values in int8 storage and dequantises per call
(83x slower than fp32 on a 576x1536 Linear); PyTorch's own ``_weight_int4pack_mm_for_cpu`` was 34x
(fp32 input) and 2.8x (bf16) slower than a dense matmul at batch 1.

A generator (``TextToImage`` saved from scratch): see :mod:`mmlm.models.compress_generator`.

A compressed folder is the model's ordinary folder (config.json, tokenizer, language/config.json; a
generator's denoiser/, text_encoder/, ...) whose weights file (``model.safetensors``;
``denoiser/diffusion_pytorch_model.safetensors``) holds the int8 tensors and scales, plus
``compression.json``. Loading builds the fp32 skeleton from the config, applies the same module swap,
then fills in the stored tensors (strictly: a missing or unexpected tensor is an error naming it).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

COMPRESSION_NAME = "compression.json"
SCHEMES = ("int8",)
PARTS = {"vision_language": ("language", "projector", "vision"), "text_to_image": ("denoiser",)}
MODEL_CLASSES = {"VisionLanguageModel": "vision_language", "TextToImage": "text_to_image"}


with warnings.catch_warnings():  # torch.ao's eager API warns of its move to torchao; its CPU kernels are current
    warnings.simplefilter("ignore")
    import torch.ao.nn.quantized as _nnq


class Int8Embedding(_nnq.Embedding):
    """torch.ao's int8 (per-row) embedding, taking non-contiguous ids too (its kernel needs contiguous ones).

    ``from_head``: the LM's head was tied to this embedding; its rows are the head's int8 rows, which are the
    ones saved.
    """

    from_head: bool = False

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return super().forward(indices.contiguous())


class CompressionError(ValueError):
    """A scheme, part or folder the compressor cannot handle."""


@dataclasses.dataclass
class CompressionConfig:
    scheme: str = "int8"
    parts: tuple[str, ...] | None = None  # None: all of the model's (PARTS[model])
    embeddings: bool = True  # int8 token embedding (and an untied int8 LM head)
    model: str = "vision_language"  # vision_language | text_to_image

    def __post_init__(self):
        if self.scheme == "int4":
            raise CompressionError("int4: no CPU kernel that pays: torchao 0.18's int4 weight-only layouts run on "
                                   "CUDA, XPU or NPU only (its CPU layout is gone), and the int4 CPU matmul in "
                                   "PyTorch itself measured 2.8-34x slower than fp32; use int8")
        if self.scheme not in SCHEMES:
            raise CompressionError(f"scheme: expected one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.model not in PARTS:
            raise CompressionError(f"model: expected one of {', '.join(PARTS)}, got {self.model!r}")
        known = PARTS[self.model]
        self.parts = known if self.parts is None else tuple(self.parts)
        unknown = [p for p in self.parts if p not in known]
        if unknown or not self.parts:
            raise CompressionError(f"parts: {'unknown ' + str(unknown) if unknown else 'none given'}; expected a "
                                   f"subset of {', '.join(known)} for a {self.model.replace('_', '-')} model")


def ao_quantization():
    """torch.ao's eager quantisation modules, without its deprecation warning (the kernels are current)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.nn.quantized as nnq
        import torch.ao.nn.quantized.dynamic as nnqd
        from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig
        from torch.ao.quantization import quantize_dynamic
    return nnq, nnqd, quantize_dynamic, per_channel_dynamic_qconfig, float_qparams_weight_only_qconfig


def _untie_head(lm: nn.Module) -> bool:
    """Give the head its own weight (so both ends can be quantised); True if they were tied."""
    head = lm.get_output_embeddings()
    tied = head is not None and head.weight is lm.get_input_embeddings().weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    config = getattr(lm, "config", None)
    if config is not None:  # so no later tie_weights() call ties them back
        config.tie_word_embeddings = False
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        text_config.tie_word_embeddings = False
    return tied


def quantize_linear_layers(module: nn.Module) -> nn.Module:
    """Every ``nn.Linear`` inside ``module`` -> a dynamically quantised int8 Linear (per-channel weights), in place."""
    *_, quantize_dynamic, linear_qconfig, _ = ao_quantization()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(module, {nn.Linear: linear_qconfig}, dtype=torch.qint8, inplace=True)
    return module


def quantize_language_model(lm: nn.Module, embeddings: bool = True) -> nn.Module:
    """A transformers causal LM with int8 Linear layers and (``embeddings``) an int8 token embedding
    and int8 head, in place. A tied pair keeps one int8 matrix: the embedding is made from the head's."""
    from mmlm.models.language import base_causal_lm

    lm.eval().requires_grad_(False)
    base = base_causal_lm(lm)
    if not embeddings:
        return quantize_linear_layers(lm)
    tied = _untie_head(base)
    if not tied:
        base.set_input_embeddings(int8_embedding(base.get_input_embeddings()))
    quantize_linear_layers(lm)
    if tied:
        _embedding_from_head(base)
    return lm


def _embedding_from_head(lm: nn.Module) -> None:
    """Set ``lm``'s input embedding to the int8 form of its (int8) head's rows."""
    head = lm.get_output_embeddings()
    embedding = int8_embedding(nn.Embedding.from_pretrained(head.weight().dequantize()))
    embedding.from_head = True
    lm.set_input_embeddings(embedding)


def int8_embedding(embedding: nn.Embedding) -> Int8Embedding:
    """``embedding`` as an int8 (per-row scale and offset) embedding.

    The weight is quantised here rather than through ``nnq.Embedding.from_float(e).weight()``: the tensor that
    ``weight()`` unpacks keeps its per-row scales and offsets in the packed object's memory (``from_blob``
    in torch's ``PackedEmbeddingBagWeight::unpack``, no copy), so once the temporary module is collected
    they are freed memory: garbage rows, NaN activations downstream ("min should be less than or equal
    to max" from the next dynamic Linear), varying with whatever the allocator reused.
    """
    *_, embedding_qconfig = ao_quantization()
    observer = embedding_qconfig.weight()
    weight = embedding.weight.detach().float()
    observer(weight)
    scales, offsets = observer.calculate_qparams()
    with warnings.catch_warnings():  # quint8 tensor creation warns of its deprecation (issue 184982); current here
        warnings.simplefilter("ignore")
        qweight = torch.quantize_per_channel(weight, scales.float(), offsets.float(), 0, torch.quint8)
    int8 = Int8Embedding(embedding.num_embeddings, embedding.embedding_dim)
    int8.set_weight(qweight)  # prepack copies the values and the per-row parameters
    return int8


def _models_with_embedding_from_head(model: nn.Module) -> list[nn.Module]:
    """The causal LMs inside ``model`` (the modules owning a head) whose int8 embedding is made from their head."""
    from mmlm.models.language import base_causal_lm

    lms = [base_causal_lm(m) for m in model.modules() if isinstance(m, PreTrainedModel)]
    return [lm for lm in lms if any(child is lm.get_output_embeddings() for child in lm.children())
            and getattr(lm.get_input_embeddings(), "from_head", False)]


def quantize(model: nn.Module, config: CompressionConfig | None = None) -> nn.Module:
    """Swap a VisionLanguageModel's modules for int8 ones in place (inference only); returns ``model``."""
    config = config or CompressionConfig()
    model.eval().requires_grad_(False)
    if "language" in config.parts:
        quantize_language_model(model.language_model, config.embeddings)
    for part in ("projector", "vision"):
        if part in config.parts:
            quantize_linear_layers(getattr(model, part))
    model.compression = config
    return model


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    nnq, nnqd, *_ = ao_quantization()
    return {name: m for name, m in model.named_modules() if isinstance(m, (nnqd.Linear, nnq.Embedding))}


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors for safetensors: each int8 module's integer weights, scales, zero points and bias,
    and every other float parameter and buffer under its own name."""
    state: dict[str, torch.Tensor] = {}
    quantized = _quantized_modules(model)
    for name, module in quantized.items():
        if getattr(module, "from_head", False):
            continue  # rebuilt from the head's int8 rows when loading
        weight = module.weight()  # its scales may alias the module's packed memory (see int8_embedding): copy them
        state[f"{name}.qweight"] = weight.int_repr()
        state[f"{name}.qscale"] = weight.q_per_channel_scales().float().clone()
        state[f"{name}.qzero"] = weight.q_per_channel_zero_points().clone()
        bias = module.bias() if callable(getattr(module, "bias", None)) else None
        if bias is not None:
            state[f"{name}.bias"] = bias.detach()
    prefixes = tuple(f"{n}." for n in quantized)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes) and isinstance(value, torch.Tensor) and not value.is_quantized:
            state[key] = value
    return {k: v.contiguous() for k, v in state.items()}


def load_quantized_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Fill a quantised skeleton from ``quantized_state``'s tensors; every tensor must be used, none missing."""
    nnq, nnqd, *_ = ao_quantization()
    state = dict(state)
    rebuilt = []
    for name, module in _quantized_modules(model).items():
        if getattr(module, "from_head", False):
            if f"{name}.qweight" not in state:
                rebuilt.append(name)
                continue
            module.from_head = False  # a folder saved before tied pairs were stored once: its own rows
        try:
            ints, scales, zeros = (state.pop(f"{name}.{k}") for k in ("qweight", "qscale", "qzero"))
        except KeyError as err:
            raise CompressionError(f"{where}: no {err.args[0]} for the int8 module {name}") from err
        if isinstance(module, nnq.Embedding):
            weight = torch._make_per_channel_quantized_tensor(ints, scales, zeros, 0)
            module.set_weight(weight)
        else:
            weight = torch._make_per_channel_quantized_tensor(ints, scales.double(), zeros, 0)
            module.set_weight_bias(weight, state.pop(f"{name}.bias", None))
    if rebuilt:
        for lm in _models_with_embedding_from_head(model):
            _embedding_from_head(lm)
    # int8 modules read only their own state-dict layout: copy the remaining float tensors one by one.
    prefixes = tuple(f"{n}." for n in _quantized_modules(model))
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items()
               if not k.startswith(prefixes) and isinstance(v, torch.Tensor)}
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise CompressionError(f"{where}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, target in targets.items():
            if target.shape != state[key].shape:
                raise CompressionError(f"{where}: {key} has shape {tuple(state[key].shape)}, "
                                       f"the model expects {tuple(target.shape)}")
            target.copy_(state[key])


def is_compressed(path: str | Path) -> bool:
    return (Path(path) / COMPRESSION_NAME).is_file()


def weights_bytes(folder: str | Path) -> int:
    """Size of every safetensors file in a model folder (a generator keeps one per part)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))


def save_compressed(model: nn.Module, out: str | Path, config: CompressionConfig | None = None) -> nn.Module:
    """Quantise the fp32 ``model`` (in place) and write it as a folder ``mmlm.load`` reads; returns the model.

    The model's own ``save_pretrained`` writes the ordinary files first (config, tokenizer, LM config,
    model card; a generator's parts); the weights file is then replaced by the int8 one.
    """
    kind = MODEL_CLASSES.get(type(model).__name__)
    config = config or CompressionConfig(model=kind or "vision_language")
    if kind != config.model:
        raise CompressionError(f"save_compressed: the config is for a {config.model} model, got {type(model).__name__}")
    if getattr(model, "compression", None) is not None:
        raise CompressionError("save_compressed: the model is already quantised; pass the fp32 model")
    out = Path(out)
    if kind == "text_to_image":
        from mmlm.models.compress_generator import save_generator

        save_generator(model, out, config)
    else:
        from mmlm.models.vlm_files import WEIGHTS_NAME

        model.save_pretrained(out)
        quantize(model, config)
        save_file(quantized_state(model), str(out / WEIGHTS_NAME), metadata={"format": "pt", "mmlm": config.scheme})
    meta = {"scheme": config.scheme, "model": config.model, "parts": list(config.parts),
            "embeddings": config.embeddings, "library": f"torch.ao dynamic quantisation (torch {torch.__version__})"}
    (out / COMPRESSION_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return model


def _read_record(path: Path) -> CompressionConfig:
    from mmlm.config import ConfigError

    meta_file = path / COMPRESSION_NAME
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        return CompressionConfig(scheme=meta["scheme"], parts=tuple(meta["parts"]), embeddings=meta["embeddings"],
                                 model=meta.get("model", "vision_language"))  # records before generators: VLMs
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{meta_file}: not a compression record ({err})") from err


def load_compressed(path: str | Path) -> nn.Module:
    """The quantised VisionLanguageModel or TextToImage in a folder written by :func:`save_compressed`."""
    path = Path(path)
    config = _read_record(path)
    if config.model == "text_to_image":
        from mmlm.models.compress_generator import load_generator

        return load_generator(path, config)
    from mmlm.models.vlm import VisionLanguageModel
    from mmlm.models.vlm_files import WEIGHTS_NAME, read_saved

    vlm_config, tokenizer, lm_config = read_saved(path)
    vlm_config.language.tokenizer = None
    model = VisionLanguageModel.from_config(vlm_config, _lm_config=lm_config, _tokenizer=tokenizer)
    quantize(model, config)
    load_quantized_state(model, load_file(str(path / WEIGHTS_NAME)), str(path / WEIGHTS_NAME))
    return model
