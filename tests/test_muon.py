"""Muon with AdamW (``train.optimizer: muon``): the orthogonalised update, which parameters it takes, the Trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmlm.config import ConfigError, TrainConfig
from mmlm.training import Trainer, parameter_groups
from mmlm.training.muon import MuonAdamW, orthogonalize
from mmlm.training.optim import build_optimizer
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


def reference_muon_step(param, grad, buffer, lr, momentum, decay, ns_steps):
    """Muon for one parameter, written out plainly: what the batched step must equal."""
    buffer.mul_(momentum).add_(grad, alpha=1 - momentum)
    nesterov = (grad * (1 - momentum) + buffer * momentum).reshape(param.shape[0], -1)
    rows, cols = nesterov.shape
    param.mul_(1 - lr * decay)
    param.add_(orthogonalize(nesterov, ns_steps).view_as(param), alpha=-lr * 0.2 * max(rows, cols) ** 0.5)


@pytest.mark.parametrize("ns_steps", [3, 5])
def test_the_batched_muon_step_equals_muon_parameter_by_parameter(ns_steps):
    """Kernels and matrices of the same (rows, cols) are stacked into one product; the result must not change."""
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (8, 36), (8, 4, 3, 3), (5, 7)]  # the first three alike as (8, 36) matrices
    ours = [nn.Parameter(torch.randn(shape)) for shape in shapes]
    reference = [p.detach().clone() for p in ours]
    buffers = [torch.zeros_like(p) for p in reference]
    optimizer = MuonAdamW([{"params": ours, "muon": True}], lr=0.02, momentum=0.9, weight_decay=0.1,
                          ns_steps=ns_steps)
    for _ in range(3):
        grads = [torch.randn(shape) for shape in shapes]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        optimizer.step()
        for p, g, b in zip(reference, grads, buffers):
            reference_muon_step(p, g, b, 0.02, 0.9, 0.1, ns_steps)
    for p, expected in zip(ours, reference):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_muon_ns_steps_reaches_the_optimizer_and_is_checked():
    with pytest.raises(ConfigError, match="train.muon_ns_steps"):
        TrainConfig(optimizer="muon", muon_ns_steps=0)
    with pytest.raises(ValueError, match="ns_steps"):
        MuonAdamW(nn.Linear(2, 2).parameters(), ns_steps=0)
    model = ConvLM()
    train = TrainConfig(optimizer="muon", muon_ns_steps=3)
    optimizer = build_optimizer(model, {"lm": model}, train)
    assert {g["ns_steps"] for g in optimizer.param_groups if g["muon"]} == {3}


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
