"""Hub-shaped LMs and tokenizers (loaded by path, no downloads): loading, weights-only folders, positions, freezing."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig

from hub_fixtures import (
    CHAT_TEMPLATES, LM_KINDS, SMOLLM2_SYSTEM, TOKENIZER_CLASSES, language_config, lm_folder, load_tokenizer,
    weights_only_folder, with_chat_template,
)
from mmlm.config import ConfigError
from mmlm.models.language import (
    IMAGE_TOKEN, LanguageConfig, build_language_model, check_sequence_fits, load_tokenizer as mmlm_load_tokenizer,
    max_positions,
)

CORPUS = ["a red circle", "a blue square"]


@pytest.mark.parametrize("kind", LM_KINDS)
def test_fixture_folders_look_like_the_hub_models(kind):
    folder = lm_folder(kind)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in folder.iterdir()}
    tokenizer = load_tokenizer(kind)
    assert type(tokenizer).__name__ == TOKENIZER_CLASSES[kind]
    ids = tokenizer("a red circle on the left")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle on the left"
    if kind in ("llama_sp", "llama_untied"):  # SentencePiece: "▁" word starts, BOS added, no pad
        assert pieces[:3] == ["<s>", "▁a", "▁red"] and tokenizer.pad_token is None
    elif kind == "gemma":  # SentencePiece without a dummy prefix, <pad>=0 <eos>=1 <bos>=2 (added)
        assert pieces[:3] == ["<bos>", "a", "▁red"]
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    elif kind == "qwen2":  # byte-level BPE, no BOS, pad == eos, ChatML
        assert pieces[:2] == ["a", "Ġred"] and tokenizer.bos_token is None
        assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
        assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    elif kind == "gpt2":  # byte-level BPE, bos == eos, no pad
        assert pieces[:2] == ["a", "Ġred"] and tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
        assert tokenizer.pad_token is None
    lm = AutoModelForCausalLM.from_pretrained(folder)
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert tied == (kind != "llama_untied")
    assert lm.config.vocab_size >= len(tokenizer)
    if kind == "qwen2":
        assert lm.config.vocab_size > len(tokenizer)  # rows past the tokenizer, as Qwen2's


@pytest.mark.parametrize("kind", LM_KINDS)
def test_mmlm_loads_each_lm_by_path_with_its_own_tokenizer(kind):
    config = language_config(kind)
    tokenizer = mmlm_load_tokenizer(config, corpus=None)
    assert IMAGE_TOKEN in tokenizer.get_vocab() and tokenizer.pad_token is not None
    own = load_tokenizer(kind)
    text = "a red circle on the left"
    assert tokenizer(text)["input_ids"] == own(text)["input_ids"]  # the LM's vocabulary, not a new one
    lm = build_language_model(config, tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(lm_folder(kind))
    rows = reference.get_input_embeddings().weight
    torch.testing.assert_close(lm.get_input_embeddings().weight[: rows.shape[0]], rows)
    assert lm.get_input_embeddings().num_embeddings >= len(tokenizer)


@pytest.mark.parametrize("kind", ["gpt2", "llama_sp", "qwen2"])
def test_a_weights_only_folder_needs_language_tokenizer(kind):
    """Pitfall 1: weights without tokenizer files never get a freshly trained tokenizer."""
    folder = weights_only_folder(kind)
    for corpus in (None, CORPUS):
        with pytest.raises(ConfigError, match=r"language\.name_or_path: .*no tokenizer files.*language\.tokenizer"):
            mmlm_load_tokenizer(LanguageConfig(name_or_path=str(folder)), corpus)
    tokenizer = mmlm_load_tokenizer(LanguageConfig(name_or_path=str(folder), tokenizer=str(lm_folder(kind))), CORPUS)
    assert tokenizer("a red")["input_ids"] == load_tokenizer(kind)("a red")["input_ids"]


def test_a_tokenizer_that_fails_to_load_names_the_key(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"language\.tokenizer: cannot load a tokenizer from"):
        mmlm_load_tokenizer(LanguageConfig(config={"model_type": "llama"}, tokenizer=str(tmp_path)), CORPUS)


def test_a_from_scratch_lm_still_trains_its_tokenizer_on_the_corpus():
    tokenizer = mmlm_load_tokenizer(LanguageConfig(config={"model_type": "llama"}, vocab_size=300), CORPUS)
    assert IMAGE_TOKEN in tokenizer.get_vocab() and 260 < len(tokenizer) <= 300 + 3  # trained: bytes + merges


# ----------------------------------------------------------------------------------------- positions
def test_max_positions_reads_each_architecture_s_key():
    assert max_positions(AutoConfig.from_pretrained(lm_folder("gpt2"))) == (128, "n_positions")
    assert max_positions(AutoConfig.from_pretrained(lm_folder("qwen2"))) == (512, "max_position_embeddings")
    assert max_positions(LlamaConfig(max_position_embeddings=256)) == (256, "max_position_embeddings")

    class NoLimit:
        pass

    assert max_positions(NoLimit()) is None


def test_a_too_long_sequence_is_a_config_error_naming_the_numbers():
    gpt2 = GPT2Config(n_positions=128)
    check_sequence_fits(gpt2, 64, 64)  # exactly full: fine
    with pytest.raises(ConfigError, match=r"96 image tokens \+ max_length 64 = 160 positions, .*n_positions is 128; "
                                          r"lower model.max_length to <= 32"):
        check_sequence_fits(gpt2, 96, 64)
    with pytest.raises(ConfigError, match=r"196 image tokens .* n_positions is 128; use fewer image tokens"):
        check_sequence_fits(gpt2, 196, 64)  # the case: a ViT-B/16 at 224 into GPT-2 at 128


# ----------------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("kind", ["llama_sp", "gpt2"])
def test_a_frozen_lm_stays_in_eval_mode_and_has_no_gradients(kind):
    config = language_config(kind, freeze=True)
    lm = build_language_model(config, mmlm_load_tokenizer(config, None))
    torch.nn.ModuleDict({"language": lm}).train()
    assert not any(m.training for m in lm.modules())  # dropout (GPT-2's resid/attn/embd) off
    assert not any(p.requires_grad for p in lm.parameters())
    trainable = build_language_model(language_config(kind), mmlm_load_tokenizer(config, None)).train()
    assert all(m.training for m in trainable.modules())


# ----------------------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_chat_templates_render_as_the_real_ones(name):
    tokenizer = with_chat_template(load_tokenizer("llama_sp"), name)
    messages = [{"role": "user", "content": "What is on the left?"}, {"role": "assistant", "content": "A circle."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    if name == "llama3":
        assert text == ("<s><|start_header_id|>user<|end_header_id|>\n\nWhat is on the left?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\nA circle.<|eot_id|>")
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    else:
        system = SMOLLM2_SYSTEM if name == "smollm2" else "You are a helpful assistant."
        assert text == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nWhat is on the left?<|im_end|>\n"
                        "<|im_start|>assistant\nA circle.<|im_end|>\n")
        assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    special = {"llama3": "<|eot_id|>"}.get(name, "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids(special) in ids  # one token, not spelled out in pieces


# ----------------------------------------------------------------------------------------- through the VLM
@pytest.mark.parametrize("kind", LM_KINDS)
def test_the_vlm_trains_and_captions_on_each_lm(kind):
    """Each Hub-shaped LM behind a SigLIP-style tower: the loss falls on a fixed batch, captions decode."""
    from PIL import Image

    from hub_fixtures import vision_config
    from mmlm.models import ProjectorConfig, VisionLanguageModel, VLMConfig

    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(VLMConfig(
        vision=vision_config("siglip", "override"), projector=ProjectorConfig(type="mlp"),
        language=language_config(kind), prompt="look:", max_length=16))
    images = [Image.new("RGB", (48, 32), c) for c in ("red", "blue")]  # non-square on purpose
    transform = model.image_transform()
    batch = model.prepare_batch(torch.stack([transform(im) for im in images]), ["a red circle", "a blue square"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    assert all(isinstance(c, str) for c in model.caption(images, max_new_tokens=3))
