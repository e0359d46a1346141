"""Tiny models of the real architectures users bring, built offline and loaded by path as a Hub id would be.

Language models (``LM_KINDS``): a folder per kind with ``config.json``, ``model.safetensors`` and the
tokenizer files, written by ``save_pretrained``; tokenizers are trained here, shaped like the real ones:

* ``llama_sp``     LlamaForCausalLM + SentencePiece BPE (byte fallback, "▁" prefix, BOS ``<s>``, no pad), tied;
* ``llama_untied`` the same tokenizer, ``tie_word_embeddings=False`` (a separate ``lm_head``, as Llama-2);
* ``qwen2``        Qwen2ForCausalLM + byte-level BPE (Qwen2Tokenizer): no BOS, pad == eos, ChatML template,
                   vocabulary padded past the tokenizer (as Qwen2's 151,936 rows for 151,665 tokens);
* ``gpt2``         GPT2LMHeadModel + byte-level BPE (GPT2Tokenizer): bos == eos == ``<|endoftext|>``, no pad,
                   learned positions (``n_positions`` = 128);
* ``gemma``        GemmaForCausalLM + SentencePiece BPE (GemmaTokenizer): ``<pad>``=0, ``<eos>``=1, ``<bos>``=2
                   (added), no "▁" prefix, embeddings scaled by sqrt(hidden).

Vision (``VISION_CASES``): timm models by their real names at tiny widths, random init; ``vision_config``
gives each at its ``pretrained_cfg`` image size or at an override.

Everything is cached per test session in one temporary folder (removed at exit): the first call builds,
later calls return the same path. Nothing downloads.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from mmlm.models.language import LanguageConfig
from mmlm.models.vision import VisionConfig

# Caption-like text with the words the tests score ("red", "left", ...), digits and a little Chinese.
CORPUS = [
    f"a {size} {colour} {shape} {where}"
    for size in ("small", "big") for colour in ("red", "blue", "green", "yellow")
    for shape in ("circle", "square", "triangle", "star") for where in ("on the left", "on the right", "at the top")
] + ["there are 2 shapes", "there are 13 shapes", "一个红色的圆", "what colour is the circle?", "The image shows"]

# ----------------------------------------------------------------------------------------- chat templates
CHATML_SYSTEM = "You are a helpful assistant."
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Qwen2 / Qwen2.5 style: ChatML with a default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + CHATML_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# SmolLM2-Instruct style: ChatML, its own default system message.
SMOLLM2_TEMPLATE = CHATML_TEMPLATE.replace(CHATML_SYSTEM, SMOLLM2_SYSTEM)
# Llama-3-Instruct style: header tokens, <|eot_id|> after each turn, BOS first.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "smollm2": SMOLLM2_TEMPLATE, "llama3": LLAMA3_TEMPLATE}
CHAT_SPECIAL_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"], "smollm2": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}


def with_chat_template(tokenizer, name: str):
    """``tokenizer`` with the special tokens and chat template of ``name`` (``CHAT_TEMPLATES``), in place."""
    missing = [t for t in CHAT_SPECIAL_TOKENS[name] if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    return tokenizer


# ----------------------------------------------------------------------------------------- session folder
@functools.cache
def session_dir() -> Path:
    """One temporary folder per test session (process), removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="mmlm-hub-fixtures-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------- tokenizers
def _sentencepiece_model(vocab_size: int, **special) -> bytes:
    """A SentencePiece BPE model (byte fallback, as Llama's and Gemma's) trained on ``CORPUS``."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, hard_vocab_limit=False, minloglevel=2,
        **special)
    return out.getvalue()


def _byte_bpe(vocab_size: int, special_tokens: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on ``CORPUS``, for GPT2Tokenizer / Qwen2Tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _build_tokenizer(kind: str, folder: Path):
    from transformers import GemmaTokenizer, GPT2Tokenizer, LlamaTokenizer, Qwen2Tokenizer

    if kind in ("llama_sp", "llama_untied"):
        (folder / "tokenizer.model").write_bytes(_sentencepiece_model(
            400, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True))
        return LlamaTokenizer.from_pretrained(folder, add_bos_token=True)  # converts tokenizer.model
    if kind == "gemma":
        (folder / "tokenizer.model").write_bytes(_sentencepiece_model(
            420, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
            unk_piece="<unk>", control_symbols=["<mask>"], add_dummy_prefix=False))
        return GemmaTokenizer.from_pretrained(folder, add_bos_token=True)
    if kind == "qwen2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        vocab, merges = _byte_bpe(400, specials)
        tok = Qwen2Tokenizer(vocab=vocab, merges=merges)  # bos None, eos = pad = <|endoftext|>
        tok.add_special_tokens({"additional_special_tokens": specials[1:]})
        tok.chat_template = CHATML_TEMPLATE
        return tok
    if kind == "gpt2":
        vocab, merges = _byte_bpe(400, ["<|endoftext|>"])
        return GPT2Tokenizer(vocab=vocab, merges=merges)  # bos = eos = unk = <|endoftext|>, no pad
    raise KeyError(f"unknown LM kind {kind!r}; expected one of {LM_KINDS}")


# ----------------------------------------------------------------------------------------- language models
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
LM_KINDS = ("llama_sp", "llama_untied", "qwen2", "gpt2", "gemma")
TOKENIZER_CLASSES = {"llama_sp": "LlamaTokenizer", "llama_untied": "LlamaTokenizer", "qwen2": "Qwen2Tokenizer",
                     "gpt2": "GPT2Tokenizer", "gemma": "GemmaTokenizer"}


def _lm_config(kind: str, vocab_size: int):
    from transformers import GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

    if kind in ("llama_sp", "llama_untied"):
        return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                           tie_word_embeddings=kind == "llama_sp", **TINY)
    if kind == "qwen2":
        padded = -(-vocab_size // 64) * 64 + 64  # rows past the tokenizer, as Qwen2's
        return Qwen2Config(vocab_size=padded, max_position_embeddings=512, tie_word_embeddings=True, **TINY)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                          bos_token_id=0, eos_token_id=0)
    if kind == "gemma":
        return GemmaConfig(vocab_size=vocab_size, head_dim=16, max_position_embeddings=512, pad_token_id=0,
                           eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, **TINY)
    raise KeyError(f"unknown LM kind {kind!r}; expected one of {LM_KINDS}")


@functools.cache
def lm_folder(kind: str) -> Path:
    """A saved tiny LM of ``kind`` (``LM_KINDS``) with its tokenizer; pass it as ``language.name_or_path``."""
    from transformers import AutoModelForCausalLM

    folder = session_dir() / "lm" / kind
    folder.mkdir(parents=True)
    tokenizer = _build_tokenizer(kind, folder)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(_lm_config(kind, len(tokenizer)))
    (folder / "tokenizer.model").unlink(missing_ok=True)  # the converted tokenizer.json is saved below
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@functools.cache
def weights_only_folder(kind: str) -> Path:
    """``lm_folder(kind)`` without its tokenizer files (a model-only export)."""
    source = lm_folder(kind)
    folder = session_dir() / "weights_only" / kind
    folder.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


def load_tokenizer(kind: str):
    """A fresh ``AutoTokenizer.from_pretrained(lm_folder(kind))``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(lm_folder(kind))


def language_config(kind: str, **overrides) -> LanguageConfig:
    """``LanguageConfig`` loading ``lm_folder(kind)`` by path, as a Hub id would be."""
    return LanguageConfig(name_or_path=str(lm_folder(kind)), **overrides)


# ----------------------------------------------------------------------------------------- vision towers
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
# name -> (timm model name, create_model overrides, VisionConfig extras)
VISION_CASES: dict[str, tuple[str, dict, dict]] = {
    "resnet_stage": ("resnet10t", {}, {"features_only_stage": 2}),  # a CNN stage (stride 8)
    "vit_cls": ("vit_tiny_patch16_224", TINY_VIT, {}),  # class token, final norm in forward_features
    "vit_avg": ("vit_base_patch16_224", {**TINY_VIT, "global_pool": "avg"}, {}),  # final norm in fc_norm
    "convnext": ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (16, 24, 32, 48)}, {}),  # final norm in head.norm
    "siglip": ("vit_base_patch16_siglip_224", TINY_VIT, {}),  # no class token, attention-pool head
    "vit_reg": ("vit_small_patch14_reg4_dinov2", TINY_VIT, {}),  # class + 4 register tokens
    "vit_reg_gap": ("vit_base_patch16_reg4_gap_256", TINY_VIT, {}),  # register tokens, avg pool, fc_norm
}
OVERRIDE_SIZE = 64  # a multiple of every case's patch size (14 -> 56 is used for patch 14)


def vision_config(case: str, size: str = "pretrained", **extras) -> VisionConfig:
    """``VisionConfig`` of ``VISION_CASES[case]`` at its ``pretrained_cfg`` size (``size="pretrained"``)
    or at ``OVERRIDE_SIZE`` (``size="override"``, via ``vision.image_size``)."""
    name, kwargs, case_extras = VISION_CASES[case]
    fields = {**case_extras, **extras}
    if size == "override":
        patch = 14 if "patch14" in name else 16
        fields["image_size"] = OVERRIDE_SIZE // patch * patch
    elif size != "pretrained":
        raise ValueError(f"size: expected 'pretrained' or 'override', got {size!r}")
    return VisionConfig(name=name, kwargs=dict(kwargs), **fields)
