"""Export to transformers' Llava: the folder loads and captions in a Python where mmlm cannot be imported."""

import json
import subprocess
import sys

import pytest
import torch

from hf_helpers import VIT, images, tiny_vlm
from mmlm.hf.llava import ExportError, export_llava
from mmlm.hf.processing import strip_answer_space

PROMPTS = ["", "look:"]

# Runs under `python -I` (no cwd, no PYTHONPATH, no user site) with mmlm blocked even where pip installed it.
CONSUMER = r"""
import json, sys
sys.modules["mmlm"] = None
try:
    import mmlm
    raise SystemExit("mmlm is importable")
except ImportError:
    pass
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

folder, images_dir, prompts, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
assert isinstance(processor, LlavaProcessor), type(processor)
images = [Image.open(f"{images_dir}/{i}.png").convert("RGB") for i in range(4)]
result = {}
for prompt in prompts:
    inputs = processor(images=images, text=["<image>" + prompt] * len(images), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    result[prompt] = {"input_ids": inputs["input_ids"].tolist(), "logits": logits.tolist(),
                      "tokens": generated.tolist(),
                      "texts": processor.batch_decode(generated, skip_special_tokens=True)}
json.dump(result, open(out, "w"))
"""


def run_consumer(tmp_path, folder):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for i, image in enumerate(images()):
        image.save(image_dir / f"{i}.png")
    script, out = tmp_path / "consumer.py", tmp_path / "out.json"
    script.write_text(CONSUMER)
    proc = subprocess.run([sys.executable, "-I", str(script), str(folder), str(image_dir), json.dumps(PROMPTS),
                           str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", [
    {"feature_layer": -2, "projector": "mlp"},
    {"feature_layer": -1, "projector": "linear", "keep_prefix_tokens": True, "resize": "squash"},
], ids=["layer-2_mlp", "last_block_linear_cls_kept_squash"])
def test_llava_export_reproduces_mmlm_without_mmlm(tmp_path, case):
    case = dict(case)
    projector = case.pop("projector")
    vlm = tiny_vlm(vision={**VIT, **case}, projector=projector)
    export_llava(vlm, tmp_path / "llava")
    result = run_consumer(tmp_path, tmp_path / "llava")
    pixels = vlm.pixel_values(images())
    for prompt in PROMPTS:
        got = result[prompt]
        input_ids = torch.tensor(got["input_ids"])
        assert input_ids[0].tolist() == vlm.prompt_ids(prompt)  # same tokens, image placeholders included
        with torch.no_grad():
            ours = vlm(pixels, input_ids, torch.ones_like(input_ids)).logits
        torch.testing.assert_close(torch.tensor(got["logits"]), ours, atol=1e-4, rtol=0)
        captions = vlm.caption(images(), prompt=prompt, max_new_tokens=8)
        assert [strip_answer_space(t) for t in got["texts"]] == captions


@pytest.mark.parametrize("change, part", [
    ({"projector": "pixel_shuffle", "reduce_factor": 2}, "pixel_shuffle projector: no Llava equivalent; use "
                                                          "projector.type=mlp"),
    ({"projector": "perceiver", "num_heads": 2}, "perceiver projector: no Llava equivalent"),
    ({"vision": {**VIT, "feature_layer": -1, "pos_embed_2d": True}}, "vision.pos_embed_2d"),
    ({"vision": {**VIT, "feature_layer": -1, "colour_stream": True}}, "vision.colour_stream"),
    ({"vision": {**VIT}}, "vision.feature_layer=null"),
    ({"vision": {"name": "resnet10t", "features_only_stage": 1, "image_size": 32}}, "only timm VisionTransformer"),
    ({"vision": {**VIT, "feature_layer": -1, "kwargs": {"patch_size": 8, "depth": 2, "init_values": 1e-5}}},
     "layer scale"),
    ({"vision": {**VIT, "feature_layer": -1}, "projector": "mlp", "hidden_dim": 32}, "projector.hidden_dim=32"),
])
def test_unmappable_parts_are_refused_by_name(tmp_path, change, part):
    change = dict(change)
    vision = change.pop("vision", {**VIT, "feature_layer": -1})
    projector = change.pop("projector", "mlp")
    vlm = tiny_vlm(vision=vision, projector=projector, **change)
    with pytest.raises(ExportError, match=part.replace(".", r"\.").replace("(", r"\(")):
        export_llava(vlm, tmp_path / "llava")
    assert not (tmp_path / "llava").exists()


def test_cli_export_writes_a_llava_folder(tmp_path):
    from mmlm.cli import main

    vlm = tiny_vlm(vision={**VIT, "feature_layer": -1})
    vlm.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "out"), "--to", "llava"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_config"]["model_type"] == "vit"
    vlm_bad = tiny_vlm(projector="pixel_shuffle", reduce_factor=2, vision={**VIT, "feature_layer": -1})
    vlm_bad.save_pretrained(tmp_path / "bad")
    assert main(["export", str(tmp_path / "bad"), str(tmp_path / "out2"), "--to", "llava"]) == 2


def test_the_llava_recipe_builds_a_model_that_exports(tmp_path):
    from pathlib import Path

    from mmlm.config import load_config
    from mmlm.hf.llava import plan_llava
    from mmlm.models import VisionLanguageModel

    recipe = load_config(Path(__file__).resolve().parents[1] / "configs" / "shapes_captioner_llava.yaml", [])
    vlm = VisionLanguageModel.from_config(recipe.model, ["a red circle on the left", "two blue squares"])
    plan = plan_llava(vlm)
    assert (plan.vision_layers, plan.feature_layer, plan.strategy) == (4, -1, "default")
    assert vlm.num_image_tokens == 64
