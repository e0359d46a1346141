import pytest
import torch

from mmlm.config import ConfigError
from mmlm.models.token_dropout import drop_answer_tokens
from mmlm.models.vlm import VLMConfig


def test_only_answer_tokens_are_replaced_and_at_about_the_rate():
    ids = torch.arange(10, 10 + 2 * 400).reshape(2, 400)
    labels = ids.clone()
    labels[:, :100] = -100  # image + prompt positions
    dropped = drop_answer_tokens(ids, labels, 0.25, replacement_id=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped[:, :100], ids[:, :100])
    changed = dropped[:, 100:] != ids[:, 100:]
    assert (dropped[:, 100:][changed] == 0).all()
    assert 0.2 < changed.float().mean().item() < 0.3
    assert torch.equal(labels[:, 100:], ids[:, 100:]), "the targets must stay as they are"


def test_rate_zero_is_the_identity_and_bad_rates_are_refused():
    ids = torch.ones(2, 5, dtype=torch.long)
    assert drop_answer_tokens(ids, ids, 0.0, 0) is ids
    with pytest.raises(ValueError, match="answer_token_dropout"):
        drop_answer_tokens(ids, ids, 1.0, 0)
    with pytest.raises(ConfigError, match=r"model.answer_token_dropout: expected a rate in \[0, 1\), got 1.5"):
        VLMConfig(answer_token_dropout=1.5)


def test_the_model_drops_tokens_in_training_only():
    from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel

    config = VLMConfig(vision=VisionConfig(name="resnet10t", image_size=32, features_only_stage=2),
                       projector=ProjectorConfig(type="mlp"),
                       language=LanguageConfig(vocab_size=300, config={
                           "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128}),
                       answer_token_dropout=0.5)
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config, corpus=["a red circle on the left", "a blue square at the top"])
    batch = model.prepare_batch(torch.randn(2, 3, 32, 32), ["a red circle on the left", "a blue square at the top"])
    model.eval()
    eval_losses = {model(**batch).loss.item() for _ in range(3)}
    model.train()
    train_losses = {model(**batch).loss.item() for _ in range(3)}
    assert len(eval_losses) == 1 and len(train_losses) > 1
    model.config.answer_token_dropout = 0.0
    assert len({model(**batch).loss.item() for _ in range(3)}) == 1, "train mode without dropout is deterministic"
