"""Structured pruning (mmlm.models.prune): exact slicing, the smaller folder, the activation criterion, the
recovery fine-tune through `mmlm train` with model.init_from, and `mmlm compress --prune-mlp`."""

import copy
import json

import pytest
import torch

import mmlm
from mmlm.api import train
from mmlm.cli import main
from mmlm.models.prune import (
    PruneConfig, PruningError, activation_statistics, calibration_batches, kept_indices, parameter_count,
    pruned_language_model, save_pruned,
)
from tests.test_compress import COLOURS, train_colour_captioner
from tests.test_explain import CNN, tiny_vlm
from tests.test_tasks import TINY_VLM, run_config


def _masked(model, kept):
    """A copy of ``model`` whose removed MLP channels and query heads are zeroed where they meet the residual
    stream (down_proj / o_proj input columns): what the pruned model must compute exactly."""
    masked = copy.deepcopy(model)
    config = masked.language_model.config
    d = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    for layer, (channels, groups) in zip(masked.language_model.model.layers, kept):
        with torch.no_grad():
            drop = torch.ones(config.intermediate_size, dtype=torch.bool)
            drop[channels] = False
            layer.mlp.down_proj.weight[:, drop] = 0
            heads = torch.ones(config.num_attention_heads, dtype=torch.bool)
            heads[(groups[:, None] * group + torch.arange(group)).flatten()] = False
            layer.self_attn.o_proj.weight.view(-1, config.num_attention_heads, d)[:, heads] = 0
    return masked


@pytest.mark.parametrize("prune", [PruneConfig(mlp=0.5), PruneConfig(heads=0.5), PruneConfig(mlp=0.7, heads=0.5)],
                         ids=["mlp", "heads", "both"])
def test_the_pruned_lm_computes_what_the_original_does_without_the_removed_channels(prune):
    torch.manual_seed(0)
    model = tiny_vlm(CNN, "mlp")
    batch = model.prepare_batch(torch.randn(2, 3, 64, 64), ["a small red circle on the left", "a big blue star"])
    kept = kept_indices(model, prune)
    small = copy.copy(model)
    small._modules = dict(model._modules, language_model=pruned_language_model(model, prune))
    config = small.language_model.config
    assert config.intermediate_size == len(kept[0][0]) == (64 if prune.mlp == 0.5 else 38 if prune.mlp else 128)
    assert config.num_key_value_heads == len(kept[0][1]) == (1 if prune.heads else 2)
    with torch.no_grad():
        expected = _masked(model, kept)(**batch).logits
        got = small(**batch).logits
        unpruned = model(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(got, unpruned, atol=1e-3)  # something was removed


def test_magnitude_keeps_the_largest_channels_and_groups():
    model = tiny_vlm(CNN, "mlp")
    layer = model.language_model.model.layers[0]
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, :10] *= 100  # channels 0-9 now dominate layer 0's scores
        layer.self_attn.v_proj.weight[32:] *= 100  # key/value group 1 (head_dim 32) dominates
    kept = kept_indices(model, PruneConfig(mlp=0.9, heads=0.5))
    assert kept[0][0].tolist() == list(range(10)) + kept[0][0].tolist()[10:] and len(kept[0][0]) == 13
    assert kept[0][1].tolist() == [1]


@pytest.fixture(scope="module")
def captioner():
    return train_colour_captioner(0)


def test_activation_statistics_are_the_mean_absolute_down_proj_input_over_label_tokens(captioner):
    model, images, _, _ = captioner
    batches = calibration_batches(model, images, batch_size=4)
    seen = []
    handle = model.language_model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, inputs: seen.append(inputs[0].detach().abs()))
    with torch.no_grad():
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    labelled = torch.cat([x[b["labels"] != -100] for x, b in zip(seen, batches)])
    stats = activation_statistics(model, batches)
    assert len(stats) == 2 and torch.allclose(stats[1]["mlp"], labelled.mean(0), atol=1e-6)
    assert stats[1]["attention"].shape == (64,)
    with pytest.raises(PruningError, match="calibration"):
        kept_indices(model, PruneConfig(mlp=0.5, criterion="activation"))


def test_a_pruned_folder_is_smaller_dense_and_loads_with_mmlm_load(captioner, tmp_path):
    model, images, captions, batch = captioner
    model.save_pretrained(tmp_path / "fp32")
    pruned = save_pruned(model, tmp_path / "pruned", PruneConfig(mlp=0.5, criterion="activation"),
                         calibration_batches(model, images))
    loaded = mmlm.load(tmp_path / "pruned")
    lm_config = json.loads((tmp_path / "pruned" / "language" / "config.json").read_text())
    assert lm_config["intermediate_size"] == 64 and loaded.language_model.config.intermediate_size == 64
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())["config"]["language"]["config"]
    assert saved["intermediate_size"] == 64  # the recipe's sizes follow the LM's
    assert parameter_count(loaded.language_model) == parameter_count(model.language_model) - 2 * 3 * 64 * 64
    size = lambda f: (tmp_path / f / "model.safetensors").stat().st_size  # noqa: E731
    assert size("pruned") < 0.9 * size("fp32")
    assert loaded.caption(images, max_new_tokens=6) == pruned.caption(images, max_new_tokens=6)
    with torch.no_grad():
        assert loaded(**batch).loss < 0.5  # an MLP half the width still knows the colours (0.01 before)
    assert sum(c == t for c, t in zip(loaded.caption(images, max_new_tokens=6), captions)) >= len(COLOURS) - 2


def test_the_recovery_fine_tune_runs_through_mmlm_train_with_init_from(tmp_path):
    from mmlm.data.shapes import canonical_caption, generate_shapes
    from mmlm.models import VisionLanguageModel

    config = run_config(tmp_path, "captioning", train={"max_steps": 4, "lr": 2e-3}, eval={"num_examples": 0})
    corpus = [canonical_caption(r.attributes["shapes"]) for r in generate_shapes(48)]
    torch.manual_seed(0)
    save_pruned(VisionLanguageModel.from_config(config.model, corpus), tmp_path / "pruned",
                PruneConfig(mlp=0.5, heads=0.5))
    tuned = run_config(tmp_path, "captioning", model={**TINY_VLM, "init_from": str(tmp_path / "pruned")},
                       train={"max_steps": 4, "lr": 2e-3}, eval={"num_examples": 0})
    result = train(tuned)
    assert result["step"] == 4
    model = mmlm.load(tmp_path / "captioning")
    assert model.language_model.config.intermediate_size == 64 and model.language_model.config.num_key_value_heads == 1
    start = mmlm.load(tmp_path / "pruned").state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())  # the weights moved
    assert all(isinstance(c, str) for c in model.caption([r.image for r in generate_shapes(2)], max_new_tokens=8))


def test_cli_prune_flags_and_errors(tmp_path, capsys):
    tiny_vlm(CNN, "mlp").save_pretrained(tmp_path / "model")
    assert main(["compress", str(tmp_path / "model"), str(tmp_path / "p"), "--prune-mlp", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "LM pruned (magnitude: MLP 50%, heads 0%)" in out and "model.init_from=" in out
    assert mmlm.load(tmp_path / "p").language_model.config.intermediate_size == 64
    cases = ((["--prune-mlp", "1.5"], "fraction"), (["--prune-mlp", "0.5", "--int8"], "fine-tune"),
             (["--prune-heads", "0.5", "--prune-criterion", "activation"], "--calibration"), ([], "--int8"))
    for flags, message in cases:
        assert main(["compress", str(tmp_path / "model"), str(tmp_path / "x")] + flags) == 2, flags
        assert message in capsys.readouterr().err, flags
    with pytest.raises(PruningError, match="nothing to prune"):
        PruneConfig()
