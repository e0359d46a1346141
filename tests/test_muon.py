"""Muon with AdamW (``train.optimizer: muon``): the orthogonalised update, which parameters it takes, the Trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmlm.config import ConfigError, TrainConfig
from mmlm.training import Trainer, parameter_groups
from mmlm.training.muon import MuonAdamW, orthogonalize
from mmlm.training.trainer import reset_accelerate_state
from tests.test_trainer import ToyTask, make_config, weights


class ConvLM(nn.Module):
    """An embedding, a conv kernel, a norm and an untied output head: each kind of parameter once."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(6, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])
def test_orthogonalize_pushes_every_singular_value_towards_one(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    matrix[:, 0] *= 50  # a badly conditioned gradient: one direction dominates
    singular = torch.linalg.svdvals(orthogonalize(matrix))
    assert torch.linalg.svdvals(matrix).max() / torch.linalg.svdvals(matrix).min() > 20
    assert singular.min() > 0.5 and singular.max() < 1.2


def test_muon_takes_kernels_and_matrices_and_leaves_embeddings_heads_and_norms_to_adamw():
    model = ConvLM()
    groups = parameter_groups(model, {"lm": model}, TrainConfig(optimizer="muon", weight_decay=0.1))
    muon = [p for g in groups if g.get("muon") for p in g["params"]]
    assert [id(p) for p in muon] == [id(model.conv.weight)]
    rest = {id(p) for g in groups if not g.get("muon") for p in g["params"]}
    assert rest == {id(p) for n, p in model.named_parameters() if n != "conv.weight"}
    adamw = parameter_groups(model, {"lm": model}, TrainConfig(weight_decay=0.1))
    assert not any(g.get("muon") for g in adamw)

    with pytest.raises(ValueError, match="Muon group 'lm'.*\\(8,\\)"):
        MuonAdamW([{"params": [model.norm.weight], "muon": True, "name": "lm"}])
    with pytest.raises(ConfigError, match="train.optimizer: expected 'adamw' or 'muon', got 'sgd'"):
        TrainConfig(optimizer="sgd")


def test_muon_step_moves_a_kernel_by_lr_times_the_rms_matched_scale():
    conv = nn.Conv2d(4, 6, 3)
    before = conv.weight.detach().clone()
    optimizer = MuonAdamW([{"params": [conv.weight], "muon": True}], lr=0.01, momentum=0.0)
    conv.weight.grad = torch.randn_like(conv.weight)
    optimizer.step()
    update = (conv.weight.detach() - before).reshape(6, -1) / -0.01
    # 0.2 * sqrt(max(6, 36)) times a matrix with singular values ~1: an RMS of ~0.2, AdamW's
    assert 0.15 < update.pow(2).mean().sqrt().item() < 0.25
    assert torch.linalg.svdvals(update / (0.2 * 6)).min() > 0.5


def test_the_adamw_groups_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    ours, reference = nn.Linear(5, 3), nn.Linear(5, 3)
    reference.load_state_dict(ours.state_dict())
    optimizers = (MuonAdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
                  torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1))
    for _ in range(5):
        x = torch.randn(4, 5)
        for model, optimizer in zip((ours, reference), optimizers):
            optimizer.zero_grad()
            model(x).pow(2).sum().backward()
            optimizer.step()
    torch.testing.assert_close(ours.weight, reference.weight)
    torch.testing.assert_close(ours.bias, reference.bias)


def test_a_muon_run_learns_and_resumes_from_its_checkpoint_bitwise(tmp_path):
    config = make_config(tmp_path / "straight", max_steps=8, save_every=4, optimizer="muon", weight_decay=0.0)
    straight = Trainer(config, ToyTask(config))
    assert isinstance(straight.optimizer.optimizer, MuonAdamW)
    untrained = straight.evaluate("val")["val/loss"]
    straight.fit()
    assert straight.evaluate("val")["val/loss"] < untrained
    reset_accelerate_state()

    config = make_config(tmp_path / "resumed", max_steps=8, save_every=4, optimizer="muon", weight_decay=0.0)
    resumed = Trainer(config, ToyTask(config), resume=str(tmp_path / "straight" / "run" / "checkpoints" / "step_000004"))
    assert resumed.step == 4
    assert any("momentum_buffer" in s for s in resumed.optimizer.state_dict()["state"].values())
    resumed.fit()
    for name, value in weights(straight).items():
        assert torch.equal(weights(resumed)[name], value), name
