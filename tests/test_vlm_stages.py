"""Stages from a saved model (``model.init_from``) and LoRA on every part (tower, projector, LM)."""

from pathlib import Path

import pytest
import torch

from hub_fixtures import language_config, vision_config
from mmlm.config import ConfigError, load_config
from mmlm.models import ProjectorConfig, VisionLanguageModel, VLMConfig
from mmlm.models.adapters import AdapterConfig, has_lora

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a small red circle on the left", "a big blue square at the top"]


def config(**kw) -> VLMConfig:
    kw.setdefault("vision", vision_config("vit_cls", "override"))
    language = language_config("llama_sp", **kw.pop("language", {}))
    return VLMConfig(projector=ProjectorConfig(type="mlp"), language=language, prompt="describe:", max_length=24, **kw)


def batch_for(model):
    torch.manual_seed(0)
    return model.prepare_batch(torch.randn(2, 3, 64, 64), CAPTIONS)


def train(model, batch, steps=3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def trainable_parts(model) -> set[str]:
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


def test_stage_two_starts_from_stage_one_s_weights_exactly(tmp_path):
    torch.manual_seed(0)
    stage1 = VisionLanguageModel.from_config(config(vision=vision_config("vit_cls", "override", freeze=True),
                                                    language={"freeze": True}))
    assert trainable_parts(stage1) == {"projector"}  # stage 1: the projector only
    batch = batch_for(stage1)
    train(stage1, batch)
    stage1.save_pretrained(tmp_path / "run" / "model")
    for init_from in (tmp_path / "run", tmp_path / "run" / "model"):  # a run folder or its model folder
        stage2 = VisionLanguageModel.from_config(config(init_from=str(init_from)))
        saved = stage1.state_dict()
        assert stage2.state_dict().keys() == saved.keys()
        assert all(torch.equal(v, saved[k]) for k, v in stage2.state_dict().items())
        assert stage2.tokenizer.get_vocab() == stage1.tokenizer.get_vocab()
        assert trainable_parts(stage2) == {"vision", "projector", "language_model"}
    with torch.no_grad():
        assert torch.equal(stage2(**batch).loss, stage1(**batch).loss)


def test_stage_two_with_lora_everywhere_starts_equal_and_saves_a_plain_model(tmp_path):
    torch.manual_seed(0)
    stage1 = VisionLanguageModel.from_config(config())
    batch = batch_for(stage1)
    train(stage1, batch, 2)
    stage1.save_pretrained(tmp_path / "stage1")
    lora = AdapterConfig(rank=4)
    stage2 = VisionLanguageModel.from_config(config(init_from=str(tmp_path / "stage1"), vision_lora=lora,
                                                    projector_lora=lora, language={"lora_rank": 4}))
    assert has_lora(stage2.vision) and has_lora(stage2.projector)
    trainable = [n for n, p in stage2.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # only the adapters train
    assert {n.split(".")[0] for n in trainable} == {"vision", "projector", "language_model"}
    with torch.no_grad():  # LoRA B starts at zero: the same function as stage 1
        torch.testing.assert_close(stage2(**batch).loss, stage1(**batch).loss)
    before = {n: p.detach().clone() for n, p in stage2.named_parameters() if not p.requires_grad}
    train(stage2, batch, 3)
    assert all(torch.equal(p, before[n]) for n, p in stage2.named_parameters() if not p.requires_grad)
    stage2.save_pretrained(tmp_path / "stage2")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "stage2").eval()
    assert not has_lora(loaded.vision) and not has_lora(loaded.projector)
    assert loaded.config.init_from is None and loaded.config.vision_lora.rank == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).loss, stage2(**batch).loss, atol=1e-5, rtol=1e-5)
        assert not torch.equal(loaded(**batch).loss, stage1(**batch).loss)  # the adapters trained


def test_init_from_names_a_missing_or_mismatching_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"model.init_from: .* holds no saved model"):
        VisionLanguageModel.from_config(config(init_from=str(tmp_path)))
    torch.manual_seed(0)
    VisionLanguageModel.from_config(config()).save_pretrained(tmp_path / "m")
    other = config(init_from=str(tmp_path / "m"))
    other.projector = ProjectorConfig(type="linear")
    with pytest.raises(ConfigError, match=r"model.init_from: the weights in .* do not fit"):
        VisionLanguageModel.from_config(other)


def test_the_two_stage_recipe_configs():
    stage1, stage2 = (load_config(ROOT / "configs" / f"llava_stage{i}.yaml") for i in (1, 2))
    assert stage1.model.vision.freeze and stage1.model.language.freeze and stage1.model.init_from is None
    assert stage2.model.init_from == stage1.output_dir and not stage2.model.language.freeze
    assert stage2.model.vision == stage1.model.vision and stage2.model.projector == stage1.model.projector
