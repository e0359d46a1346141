"""Saving and loading: round-trips, local LM folders, local timm weights, LoRA. No downloads."""

import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mmlm.config import ConfigError
from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig, train_tokenizer

CORPUS = ["a red circle", "a blue square", "a green triangle"]
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2}
IMAGES = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "green")]
VISION = VisionConfig(name="resnet10t", features_only_stage=1, image_size=32, pos_embed_2d=True)


def config(language: LanguageConfig, projector="mlp") -> VLMConfig:
    return VLMConfig(vision=VISION, projector=ProjectorConfig(type=projector), language=language, prompt="look:")


def scratch_model(seed=0, **language) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return VisionLanguageModel.from_config(config(LanguageConfig(config=dict(TINY_LLAMA), vocab_size=300, **language)),
                                           CORPUS)


def batch_of(model):
    transform = model.image_transform()
    return model.prepare_batch(torch.stack([transform(im) for im in IMAGES]), CORPUS)


def train_steps(model, steps=3):
    batch = batch_of(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def assert_same_outputs(a, b):
    batch = batch_of(a)
    torch.testing.assert_close(b(**batch).logits, a(**batch).logits, atol=1e-5, rtol=1e-5)
    assert b.caption(IMAGES, max_new_tokens=6) == a.caption(IMAGES, max_new_tokens=6)


@pytest.mark.parametrize("projector", ["mlp", "pixel_shuffle", "perceiver"])
def test_save_and_load_round_trip(tmp_path, projector):
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(
        config(LanguageConfig(config=dict(TINY_LLAMA), vocab_size=300), projector), CORPUS)
    train_steps(model)  # BatchNorm statistics and weights move away from their init
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "language"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert json.loads((tmp_path / "language" / "config.json").read_text())["model_type"] == "llama"
    loaded = VisionLanguageModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    assert_same_outputs(model, loaded)


def test_language_model_from_a_local_transformers_folder(tmp_path):
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **{k: v for k, v in TINY_LLAMA.items()
                                                                    if k != "model_type"}))
    lm.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    model = VisionLanguageModel.from_config(config(LanguageConfig(name_or_path=str(tmp_path / "llama"))))
    torch.testing.assert_close(model.language_model.get_input_embeddings().weight, lm.get_input_embeddings().weight)
    train_steps(model)
    model.save_pretrained(tmp_path / "vlm")
    assert_same_outputs(model, VisionLanguageModel.from_pretrained(tmp_path / "vlm").eval())


def test_gpt2_folder_without_tokenizer_needs_language_tokenizer(tmp_path):
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=260, n_embd=32, n_layer=1, n_head=2, n_positions=128))
    lm.save_pretrained(tmp_path / "gpt2")
    for corpus in (None, CORPUS):  # a corpus must not buy a fresh tokenizer for pretrained embeddings
        with pytest.raises(ConfigError, match=r"language\.name_or_path: .* no tokenizer files.*language\.tokenizer"):
            VisionLanguageModel.from_config(config(LanguageConfig(name_or_path=str(tmp_path / "gpt2"))), corpus)
    train_tokenizer(CORPUS, vocab_size=300).save_pretrained(tmp_path / "tokenizer")
    model = VisionLanguageModel.from_config(config(LanguageConfig(name_or_path=str(tmp_path / "gpt2"),
                                                                  tokenizer=str(tmp_path / "tokenizer"))))
    embeddings = model.language_model.get_input_embeddings().weight
    assert embeddings.shape[0] == len(model.tokenizer) > 260  # resized for the trained vocabulary
    torch.testing.assert_close(embeddings[:260], lm.get_input_embeddings().weight)
    assert all(isinstance(c, str) for c in model.caption(IMAGES, max_new_tokens=3))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_from_a_local_file(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=10)
    path = tmp_path / f"resnet10t{suffix}"
    state = source.state_dict()
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    for vision in (VisionConfig(name="resnet10t", weights_path=str(path), image_size=32),
                   VisionConfig(name="resnet10t", weights_path=str(path), image_size=32, features_only_stage=1)):
        model = VisionLanguageModel.from_config(VLMConfig(vision=vision, language=LanguageConfig(
            config=dict(TINY_LLAMA), vocab_size=300)), CORPUS)
        loaded = model.vision.backbone.state_dict()
        for key in ("conv1.0.weight", "layer1.0.conv1.weight", "bn1.running_mean"):
            torch.testing.assert_close(loaded[key], state[key])
        assert "fc.weight" not in loaded  # classifier dropped
    with pytest.raises(ConfigError, match="not found"):
        VisionConfig(name="resnet10t", weights_path=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("merge", [True, False])
def test_lora_trains_saves_and_loads_back(tmp_path, merge):
    model = scratch_model(lora_rank=4, lora_alpha=8.0, lora_merge_on_save=merge)
    trainable = {n for n, p in model.language_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    train_steps(model)  # LoRA B starts at zero: train so the adapter changes the outputs
    model.save_pretrained(tmp_path)
    loaded = VisionLanguageModel.from_pretrained(tmp_path).eval()
    assert hasattr(loaded.language_model, "peft_config") != merge  # merged -> a plain transformers model
    assert hasattr(model.language_model, "peft_config")  # saving did not merge the live model
    assert_same_outputs(model, loaded)
    labels = ["red circle", "blue square", "red"]
    torch.testing.assert_close(model.classify(IMAGES, labels), loaded.classify(IMAGES, labels), atol=1e-5, rtol=0)
    pv = torch.stack([model.image_transform()(im) for im in IMAGES])
    torch.testing.assert_close(model.label_log_likelihoods(pv, labels, "a {}", method="tree"),
                               model.label_log_likelihoods(pv, labels, "a {}", method="naive"), atol=1e-4, rtol=0)


def test_trust_remote_code_is_off_unless_asked(tmp_path, monkeypatch):
    assert LanguageConfig().trust_remote_code is False
    seen = {}
    import transformers

    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2))
    lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    VisionLanguageModel.from_config(config(LanguageConfig(name_or_path=str(tmp_path))))
    assert seen["trust_remote_code"] is False


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        VisionLanguageModel.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="unknown timm model"):
        VisionLanguageModel.from_config(VLMConfig(vision=VisionConfig(name="resnet_does_not_exist")), CORPUS)
    with pytest.raises(ConfigError, match="corpus"):
        VisionLanguageModel.from_config(config(LanguageConfig(config=dict(TINY_LLAMA))))
    with pytest.raises(ConfigError, match="model_type"):
        LanguageConfig(config={"hidden_size": 64})
    with pytest.raises(ConfigError, match="cannot load"):
        VisionLanguageModel.from_config(config(LanguageConfig(name_or_path=str(tmp_path / "missing_lm"))), CORPUS)
