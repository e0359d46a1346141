"""Model cards: every saved folder has a README.md in the Hub's format; the trainer's final save adds the run."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from hf_helpers import tiny_vlm
from mmlm.model_card import read_model_card, write_model_card
from mmlm.training import Trainer
from test_trainer import ToyTask, make_config


def test_save_pretrained_writes_a_hub_model_card(tmp_path):
    tiny_vlm(prompt="look:").save_pretrained(tmp_path)
    header, body = read_model_card(tmp_path)
    assert header["library_name"] == "mmlm" and header["pipeline_tag"] == "image-text-to-text"
    assert "mmlm" in header["tags"] and "image-to-text" in header["tags"]
    assert "timm `vit_tiny_patch16_224`" in body and "projector: `mlp`" in body and "`look:`" in body
    assert "AutoModelForImageTextToText.from_pretrained" in body and "## Evaluation" not in body


def test_the_card_carries_recipe_data_steps_metrics_and_a_picture(tmp_path):
    folder = tmp_path / "model"
    tiny_vlm().save_pretrained(folder)
    recipe = tmp_path / "config.yaml"
    recipe.write_text("task: captioning\n")
    picture = tmp_path / "grid.png"
    Image.new("RGB", (8, 8), "red").save(picture)
    write_model_card(folder, recipe=recipe, data="shapes", steps=1500, metrics={"test/exact_match": 0.9375,
                                                                                  "step": 1500, "note": "text"})
    write_model_card(folder, recipe=recipe, data="shapes", steps=1500, metrics={"test/exact_match": 0.9375},
                     image=picture)
    header, body = read_model_card(folder)
    assert header["library_name"] == "mmlm"
    assert "- data: `shapes`" in body and "- steps: `1500`" in body
    assert "| test/exact_match | 0.9375 |" in body
    assert "![samples](sample.png)" in body and (folder / "sample.png").read_bytes() == picture.read_bytes()
    assert (folder / "recipe.yaml").read_text() == "task: captioning\n"


class SavedModelTask(ToyTask):
    """A toy task with an evaluation picture that saves a folder the way mmlm's models do (config.json naming
    the class)."""

    def evaluate(self, model, dataset, out_dir, split):
        Image.new("RGB", (16, 8), (200, 30, 30)).save(Path(out_dir) / "samples.png")
        return super().evaluate(model, dataset, out_dir, split)

    def save_model(self, model, directory):
        super().save_model(model, directory)
        (Path(directory) / "config.json").write_text(json.dumps({"model_class": "TextToImage", "config": {}}))


def test_the_trainers_final_save_adds_the_run_to_the_card(tmp_path):
    config = make_config(tmp_path, max_steps=4, eval_every=2)
    Trainer(config, SavedModelTask(config)).fit()
    model = Path(config.output_dir) / "model"
    header, body = read_model_card(model)
    assert header["pipeline_tag"] == "text-to-image"
    assert "- steps: `4`" in body and "recipe.yaml" in body and (model / "recipe.yaml").is_file()
    assert "| val/loss |" in body
    assert (model / "sample.png").is_file() and "![samples](sample.png)" in body
