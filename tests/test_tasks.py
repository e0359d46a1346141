"""The three tasks through the shared Trainer, end to end on tiny models and tiny shapes data."""

import json

import pytest

import mmlm
from mmlm.api import evaluate, load, model_kind, train
from mmlm.config import load_config

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}
TINY_VLM = {
    "vision": {"name": "resnet10t", "features_only_stage": 1, "image_size": 32, "pos_embed_2d": True},
    "projector": {"type": "mlp"},
    "language": {"config": TINY_LLAMA, "vocab_size": 300},
}
TINY_SHAPES = {"n_train": 48, "n_val": 8, "n_test": 8, "n_compositional": 8, "image_size": 32, "max_shapes": 1}


def run_config(tmp_path, task, model=TINY_VLM, **sections):
    data = {"task": task, "output_dir": str(tmp_path / task), "model": model,
            "data": {"source": "shapes", "shapes": TINY_SHAPES, "batch_size": 8, "eval_batch_size": 8},
            "train": {"max_steps": 6, "warmup_steps": 2, "lr": 1e-3, "log_every": 2},
            "eval": {"splits": ["test"], "num_examples": 4}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return load_config(data)


def test_captioning_trains_evaluates_and_saves(tmp_path):
    result = train(run_config(tmp_path, "captioning"))
    run = tmp_path / "captioning"
    assert result["step"] == 6
    for name in ("config.yaml", "metrics.jsonl", "loss_curve.png", "model/config.json", "metrics.json",
                 "report.md", "report.html"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    assert "test/exact_match" in report and "images/test_captions.png" in report
    test = {k: v for k, v in result.items() if k.startswith("test/")}
    assert 0.0 <= test["test/exact_match"] <= 1.0 and 0.0 <= test["test/bleu_4"] <= 1.0
    assert model_kind(run / "model") == "vision_language"
    captioner = load(run)
    assert isinstance(captioner, mmlm.VisionLanguageModel)
    # evaluation scores what the saved model says about the raw images (no double preprocessing)
    from mmlm.config import ShapesConfig
    from mmlm.data.shapes import generate_shapes

    rows = [json.loads(line) for line in next(run.rglob("test_captions.jsonl")).read_text().splitlines()]
    records = generate_shapes(len(rows), split="test", config=ShapesConfig(**TINY_SHAPES))
    assert [r["prediction"] for r in rows] == captioner.caption([r.image for r in records], max_new_tokens=48)
    metrics = evaluate(run, split="val")
    assert json.loads((run / "eval_val" / "metrics.json").read_text())["num_samples"] == metrics["num_samples"] == 8
    assert "val_captions.png" in (run / "eval_val" / "report.md").read_text()


def test_classification_by_prompt_on_combined_labels(tmp_path):
    cfg = run_config(tmp_path, "classification", data={"label_field": "colour+kind"},
                     eval={"templates": ["a photo of a {}"], "num_examples": 0})
    result = train(cfg)
    assert 0.0 <= result["test/accuracy"] <= 1.0
    assert (tmp_path / "classification" / "eval").is_dir()
    pngs = list((tmp_path / "classification" / "eval").rglob("test_confusion.png"))
    assert pngs, "confusion matrix picture missing"


def test_classification_requires_template_slot(tmp_path):
    cfg = run_config(tmp_path, "classification", eval={"templates": ["a photo"]})
    with pytest.raises(ValueError, match="slot"):
        train(cfg)


TINY_T2I = {
    "image_size": 16, "space": "latent",
    "denoiser": {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 4,
                 "hidden_size": 16, "num_layers": 1},
    "text_encoder": {"hidden_size": 16, "num_layers": 1, "num_heads": 1, "max_length": 8, "vocab_size": 300},
    "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4, "batch_size": 8, "train_steps": 5},
}


def test_diffusion_trains_vae_then_denoiser_and_reports_fidelity(tmp_path):
    cfg = run_config(tmp_path, "diffusion", model=TINY_T2I,
                     eval={"samplers": ["dpm++:4", "ddim:6"], "max_samples": 8, "judge_steps": 20},
                     train={"ema_decay": 0.9})
    result = train(cfg)
    run = tmp_path / "diffusion"
    for key in ("test/fidelity", "test/fidelity/ddim:6", "test/fid", "test/kid_mean"):
        assert key in result, key
    assert 0.0 <= result["test/fidelity"] <= 1.0
    assert (run / "shapes_judge.safetensors").is_file() or list(run.rglob("shapes_judge.safetensors"))
    assert list(run.rglob("test_generated.png"))
    generator = load(run)
    assert isinstance(generator, mmlm.TextToImage)
    assert generator.latent_scale > 0  # the VAE pre-stage ran and set its scale from the data
    images = generator.generate(["a small red circle on the left"], num_inference_steps=2, seed=0)
    assert images[0].size == (16, 16)
