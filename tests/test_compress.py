"""int8 compression (mmlm.models.compress) and `mmlm compress`: what is quantised, the saved folder, loading."""

import copy
import json

import pytest
import torch

import mmlm
from mmlm.cli import main
from mmlm.data.shapes import generate_shapes
from mmlm.models.compress import (
    COMPRESSION_NAME, CompressionConfig, CompressionError, int8_embedding, load_compressed, load_quantized_state,
    quantize, quantized_state, save_compressed,
)
from tests.test_explain import CNN, ONE_SHAPE, VIT, tiny_vlm


def _kinds(model):
    """Names of the int8 module types in ``model`` (torch.ao's quantised classes are also called Linear/Embedding)."""
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd

    found = set()
    for m in model.modules():
        if isinstance(m, nnqd.Linear):
            found.add("DynamicQuantizedLinear")
        elif isinstance(m, nnq.Embedding):
            found.add("QuantizedEmbedding")
    return found


def _reseeded(model, seed):
    """``model`` with its LM and projector matrices redrawn from N(0, 0.02) under ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for part in (model.language_model, model.projector):
            for p in part.parameters():
                if p.dim() > 1:
                    p.data.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("vision", [CNN, VIT], ids=["cnn", "vit"])
def test_quantize_swaps_linear_layers_and_embedding_and_keeps_outputs_close(vision, seed):
    model = _reseeded(tiny_vlm(vision, "mlp"), seed)
    pixels = model.pixel_values([r.image for r in generate_shapes(2, config=ONE_SHAPE)])
    batch = model.prepare_batch(pixels, ["a small red circle on the left", "a large blue star at the top"])
    with torch.no_grad():
        reference = model(**batch).logits
    quantize(model)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())  # every Linear is int8 now
    assert {"DynamicQuantizedLinear", "QuantizedEmbedding"} <= _kinds(model)
    with torch.no_grad():
        logits = model(**batch).logits
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()  # measured <= 0.02 over 16 inits


def test_int8_embedding_rows_survive_the_float_module_and_later_allocations():
    """The int8 embedding owns its per-row scales: torch's ``weight()`` unpack aliases the packed object's
    memory, and quantising through a temporary module left freed memory as scales (garbage, NaN rows)."""
    import gc

    embedding = torch.nn.Embedding(300, 64)
    reference = embedding.weight.detach().clone()
    int8 = int8_embedding(embedding)
    del embedding
    gc.collect()
    _ = [torch.randn(300, 64) for _ in range(50)]  # reuse whatever was freed
    rows = int8(torch.arange(300))
    step = (reference.amax(1) - reference.amin(1)) / 255  # one quantisation step per row
    assert torch.isfinite(rows).all()
    assert ((rows - reference).abs() <= step[:, None] * 0.51).all()


COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def train_colour_captioner(seed: int, steps: int = 120):
    """A tiny ViT + Llama captioner trained (full batch) to name the colour of a plain image, on one thread:
    its ops are too small to split, and split on a shared CPU a step costs 10-30x more (measured)."""
    from PIL import Image

    images = [Image.new("RGB", (32, 32), c) for c in COLOURS]
    captions = [f"a {c} picture" for c in COLOURS]
    model = _reseeded(tiny_vlm(VIT, "mlp", corpus=captions * 8), seed).train()
    batch = model.prepare_batch(model.pixel_values(images), captions)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
            for _ in range(steps):
                loss = model(**batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), images, captions, batch


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda s: f"seed{s}")
def colour_captioner(request):
    return train_colour_captioner(request.param)


def test_a_trained_captioner_keeps_its_captions_and_token_log_probs_in_int8(colour_captioner, tmp_path):
    model, images, captions, batch = colour_captioner
    assert model.caption(images, max_new_tokens=6) == captions  # it learned: the comparison below means something
    targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]

    def outputs(m):
        with torch.no_grad():
            logits = m(**batch).logits  # at the caption's label positions
        return logits, logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]

    reference, reference_log_probs = outputs(model)
    save_compressed(copy.deepcopy(model), tmp_path / "int8")
    int8 = mmlm.load(tmp_path / "int8")
    assert int8.caption(images, max_new_tokens=6) == captions
    logits, log_probs = outputs(int8)
    assert (logits - reference).abs().max() < 0.06 * reference.abs().max()  # measured 0.012-0.030 over 6 seeds
    assert (log_probs - reference_log_probs).abs().max() < 0.05  # nats; measured <= 0.006
    labels = [f"{c} picture" for c in COLOURS]
    pixels = model.pixel_values(images)
    assert torch.equal(int8.label_log_likelihoods(pixels, labels, "a {}").argmax(1), torch.arange(len(COLOURS)))


def test_save_and_mmlm_load_give_the_same_int8_model(tmp_path):
    model = tiny_vlm(VIT, "mlp")
    images = [r.image for r in generate_shapes(3, config=ONE_SHAPE)]
    save_compressed(model, tmp_path / "int8", CompressionConfig(parts=("language", "projector", "vision")))
    meta = json.loads((tmp_path / "int8" / COMPRESSION_NAME).read_text())
    assert meta["scheme"] == "int8" and meta["parts"] == ["language", "projector", "vision"]
    loaded = mmlm.load(tmp_path / "int8")  # the public loader dispatches on compression.json
    assert "DynamicQuantizedLinear" in _kinds(loaded.vision)  # the ViT's blocks
    assert loaded.caption(images, max_new_tokens=6) == model.caption(images, max_new_tokens=6)
    pixels = loaded.pixel_values(images)
    assert torch.equal(loaded.label_log_likelihoods(pixels, ["red circle", "blue star"], "a {}"),
                       model.label_log_likelihoods(pixels, ["red circle", "blue star"], "a {}"))


def test_a_compressed_folder_is_smaller_and_holds_only_plain_tensors(tmp_path):
    model = tiny_vlm(CNN, "linear")
    model.save_pretrained(tmp_path / "fp32")
    save_compressed(tiny_vlm(CNN, "linear"), tmp_path / "int8", CompressionConfig(parts=("language",)))
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "int8" / "model.safetensors"))
    assert state["language_model.lm_head.qweight"].dtype == torch.int8
    assert not any(k.startswith("language_model.model.embed_tokens.") for k in state)  # tied: stored once, as the head
    assert state["projector.weight"].dtype == torch.float32  # projector left out by --parts
    lm_fp32 = sum(v.numel() * 4 for k, v in load_file(str(tmp_path / "fp32" / "model.safetensors")).items()
                  if k.startswith("language_model."))
    lm_int8 = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith("language_model."))
    assert lm_int8 < 0.4 * lm_fp32


def test_loading_names_a_missing_or_unexpected_tensor(tmp_path):
    model = quantize(tiny_vlm(CNN, "mlp"))
    state = quantized_state(model)
    broken = dict(state)
    del broken["projector.net.0.qscale"]
    with pytest.raises(CompressionError, match="projector.net.0.qscale"):
        load_quantized_state(quantize(tiny_vlm(CNN, "mlp")), broken, "model.safetensors")
    extra = {**state, "stray.weight": torch.zeros(1)}
    with pytest.raises(CompressionError, match="stray.weight"):
        load_quantized_state(quantize(tiny_vlm(CNN, "mlp")), extra, "model.safetensors")
    with pytest.raises(CompressionError, match="already quantised"):
        save_compressed(model, tmp_path / "again")


def test_compression_config_errors():
    with pytest.raises(CompressionError, match="int4.*torchao.*CPU"):
        CompressionConfig(scheme="int4")
    with pytest.raises(CompressionError, match="int8"):
        CompressionConfig(scheme="fp8")
    with pytest.raises(CompressionError, match="decoder"):
        CompressionConfig(parts=("decoder",))


def test_cli_compress_flags(tmp_path, capsys):
    tiny_vlm(CNN, "pixel_shuffle").save_pretrained(tmp_path / "model")
    assert main(["compress", str(tmp_path / "model"), str(tmp_path / "int8"), "--int8",
                 "--parts", "language,projector"]) == 0
    assert "int8 (language, projector)" in capsys.readouterr().out
    assert json.loads((tmp_path / "int8" / COMPRESSION_NAME).read_text())["parts"] == ["language", "projector"]
    assert mmlm.load(tmp_path / "int8").compression.parts == ("language", "projector")
    assert main(["compress", str(tmp_path / "model"), str(tmp_path / "int4"), "--int4"]) == 2
    assert "torchao" in capsys.readouterr().err and not (tmp_path / "int4").exists()
    assert main(["compress", str(tmp_path / "model"), str(tmp_path / "x"), "--int8", "--parts", "decoder"]) == 2


def test_load_compressed_reports_a_bad_record(tmp_path):
    save_compressed(tiny_vlm(CNN, "mlp"), tmp_path / "int8")
    (tmp_path / "int8" / COMPRESSION_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=COMPRESSION_NAME):
        load_compressed(tmp_path / "int8")


# ---------------------------------------------------------------------------- the generator's denoiser


@pytest.mark.parametrize("kind", ["unet", "transformer"])
def test_an_int8_generator_loads_through_mmlm_load_and_draws_the_fp32_images(kind, tmp_path):
    from mmlm.models.diffusion import DenoiserConfig
    from tests.test_diffusion import tiny_model

    denoiser = DenoiserConfig(block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4,
                              hidden_size=16, num_layers=1, num_heads=2, kind=kind, pooled_text=kind == "unet")
    model = tiny_model(denoiser=denoiser).eval()
    prompts = ["a red circle", "a blue square"]
    draw = lambda m: m.generate(prompts, num_inference_steps=4, seed=0, output_type="pt")  # noqa: E731
    reference = draw(model)
    model.save_pretrained(tmp_path / "fp32")
    returned = save_compressed(copy.deepcopy(model), tmp_path / "int8")
    int8 = mmlm.load(tmp_path / "int8")
    assert type(int8).__name__ == "TextToImage" and int8.compression.parts == ("denoiser",)
    assert "DynamicQuantizedLinear" in _kinds(int8.denoiser)
    assert not any(type(m) is torch.nn.Linear for m in int8.denoiser.modules())
    images = draw(int8)
    assert torch.equal(images, draw(returned))  # the file holds exactly the model save_compressed returned
    other_denoiser = (draw(tiny_model(seed=1, denoiser=denoiser)) - reference).abs().mean()  # same noise
    difference = (images - reference).abs().mean()
    assert difference < 0.02 and difference < 0.1 * other_denoiser, (difference, other_denoiser)  # measured 0.002-0.003
    file = "denoiser/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "int8" / file).stat().st_size < 0.75 * (tmp_path / "fp32" / file).stat().st_size
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "int8" / file))
    assert state["conv_in.qweight"].dtype == torch.int8 if kind == "unet" else True  # convolutions stored int8
    assert all(v.dtype != torch.float32 for k, v in state.items() if k.endswith(".qweight"))
    assert not (tmp_path / "int8" / "model_index.json").exists()  # diffusers' route cannot read int8 weights


def test_cli_compresses_a_generator_and_refuses_a_pipeline_or_vlm_part(tmp_path, capsys):
    from tests.test_diffusion import tiny_model

    model = tiny_model()
    model.save_pretrained(tmp_path / "gen")
    assert main(["compress", str(tmp_path / "gen"), str(tmp_path / "int8"), "--int8"]) == 0
    assert "int8 (denoiser)" in capsys.readouterr().out
    assert mmlm.load(tmp_path / "int8").compression.model == "text_to_image"
    assert main(["compress", str(tmp_path / "gen"), str(tmp_path / "x"), "--int8", "--parts", "language"]) == 2
    assert "denoiser" in capsys.readouterr().err
    model.config.pipeline = "some/pipeline"  # as a generator fine-tuned from a diffusers pipeline has
    with pytest.raises(CompressionError, match="diffusers pipeline"):
        save_compressed(model, tmp_path / "pipeline", CompressionConfig(model="text_to_image"))
    with pytest.raises(CompressionError, match="text_to_image model, got VisionLanguageModel"):
        save_compressed(tiny_vlm(CNN, "mlp"), tmp_path / "wrong", CompressionConfig(model="text_to_image"))


def test_a_tied_embedding_is_the_heads_int8_matrix_stored_once_and_old_folders_with_two_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_vlm(CNN, "mlp")
    assert model.language_model.config.tie_word_embeddings
    images = [r.image for r in generate_shapes(3, config=ONE_SHAPE)]
    save_compressed(model, tmp_path / "int8")
    lm = model.language_model
    head_rows = lm.get_output_embeddings().weight().dequantize()
    embedded = lm.get_input_embeddings()(torch.arange(head_rows.shape[0]))
    assert (embedded - head_rows).abs().max() <= head_rows.abs().max() / 200  # one int8 matrix, two layouts
    loaded = mmlm.load(tmp_path / "int8")
    assert torch.equal(loaded.language_model.get_input_embeddings()(torch.arange(5)), embedded[:5])
    assert loaded.caption(images, max_new_tokens=6) == model.caption(images, max_new_tokens=6)

    # a folder written before tied pairs were stored once holds the embedding too: it is read as its own rows
    weights = tmp_path / "int8" / "model.safetensors"
    state = load_file(str(weights))
    own_module = int8_embedding(torch.nn.Embedding.from_pretrained(torch.randn_like(head_rows)))
    own = own_module.weight()  # its scales live in own_module's memory: keep the module (see int8_embedding)
    name = "language_model.model.embed_tokens"
    state.update({f"{name}.qweight": own.int_repr(), f"{name}.qscale": own.q_per_channel_scales().float().clone(),
                  f"{name}.qzero": own.q_per_channel_zero_points().clone()})
    save_file(state, str(weights), metadata={"format": "pt"})
    old = mmlm.load(tmp_path / "int8")
    assert torch.allclose(old.language_model.get_input_embeddings()(torch.arange(5)), own.dequantize()[:5],
                          atol=1e-6)  # its own rows (random), not the head's
