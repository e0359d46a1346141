"""model.image_word_loss: each answer word must be found in some image token, under the LM's embeddings."""

import pytest
import torch

from mmlm.config import ConfigError
from mmlm.models import LanguageConfig, ProjectorConfig, VisionConfig, VisionLanguageModel, VLMConfig
from mmlm.models.image_words import ImageWordHead

CAPTIONS = ["a red circle on the left", "a blue square at the top"]


def tiny_config(**overrides) -> VLMConfig:
    return VLMConfig(vision=VisionConfig(name="resnet10t", image_size=32, features_only_stage=2),
                     projector=ProjectorConfig(type="mlp"),
                     language=LanguageConfig(vocab_size=300, config={
                         "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
                         "tie_word_embeddings": True}),
                     **overrides)


def test_tokens_that_hold_the_answer_words_score_better_than_tokens_that_hold_other_words():
    torch.manual_seed(0)
    vocab = torch.eye(20)  # orthogonal word embeddings: cosine 1 with itself, 0 with any other
    head = ImageWordHead(20, ignore_ids=[0])
    # Two samples: 3 image tokens then 3 answer tokens; sample 0 says words 4, 5, 6; sample 1 says 7, 8, 9.
    labels = torch.tensor([[-100, -100, -100, 4, 5, 6], [-100, -100, -100, 7, 8, 9]])
    image_mask = torch.tensor([[True] * 3 + [False] * 3] * 2)

    def embeds(words_0, words_1):
        e = torch.zeros(2, 6, 20)
        e[0, :3], e[1, :3] = vocab[words_0], vocab[words_1]
        return e

    right = head(embeds([4, 5, 6], [7, 8, 9]), image_mask, labels, vocab)
    swapped = head(embeds([7, 8, 9], [4, 5, 6]), image_mask, labels, vocab)
    # Present words at cosine 1 (logit 10), absent ones at 0 (logit 0); swapped, absent words at 10.
    assert right < 0.4 and swapped > 5.0
    # Special ids (EOS, pad) are never targets: adding one to the answers changes nothing.
    with_eos = torch.cat([labels, torch.zeros(2, 1, dtype=torch.long)], dim=1)
    mask_eos = torch.cat([image_mask, torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    assert torch.allclose(head(torch.cat([embeds([4, 5, 6], [7, 8, 9]), torch.zeros(2, 1, 20)], 1), mask_eos,
                               with_eos, vocab), right)
    # Only image positions count: the same words at text positions do not help.
    text_only = torch.zeros(2, 6, 20)
    text_only[0, 3:], text_only[1, 3:] = vocab[[4, 5, 6]], vocab[[7, 8, 9]]
    assert head(text_only, image_mask, labels, vocab) > right + 0.3


def test_a_weight_below_zero_is_refused_by_name():
    with pytest.raises(ConfigError, match="model.image_word_loss: expected a weight >= 0, got -1"):
        VLMConfig(image_word_loss=-1)


def test_the_term_trains_the_image_side_only_and_only_in_training():
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_config(image_word_loss=1.0), corpus=CAPTIONS)
    batch = model.prepare_batch(torch.randn(2, 3, 32, 32), CAPTIONS)
    model.eval()
    evaluated = model(**batch)
    assert evaluated.image_word_loss is None
    model.train()
    out = model(**batch)
    assert out.image_word_loss is not None and out.image_word_loss > 0
    model.config.image_word_loss = 0.0
    lm_only = model(**batch).loss  # train mode too (batch-norm statistics), without the term
    model.config.image_word_loss = 1.0
    torch.testing.assert_close(out.loss, lm_only + out.image_word_loss)
    model.zero_grad()
    out.image_word_loss.backward()
    embedding = model.language_model.get_input_embeddings().weight
    assert embedding.grad is None or not embedding.grad.any(), "the LM's word embeddings are read detached"
    assert any(p.grad is not None and p.grad.any() for p in model.vision.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.projector.parameters())
    assert model.image_words.bias.grad.any() and model.image_words.log_scale.grad is not None


def test_micro_batches_weigh_the_term_by_their_share_of_label_tokens():
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_config(image_word_loss=0.5), corpus=CAPTIONS).train()
    batch = model.prepare_batch(torch.randn(2, 3, 32, 32), CAPTIONS)
    out = model(**batch)
    n = out.num_label_tokens
    split = model(**batch, num_items_in_batch=2 * n)  # this micro-batch holds half of the step's tokens
    torch.testing.assert_close(split.loss, out.loss / 2)
    summed = model(**batch, reduction="sum")
    torch.testing.assert_close(summed.loss, out.loss * n)


def test_saved_models_and_init_from_leave_the_training_head_out(tmp_path):
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_config(image_word_loss=1.0), corpus=CAPTIONS)
    model.save_pretrained(tmp_path / "with")
    assert not any(k.startswith("image_words.") for k in model.plain_state_dict())
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "with").eval()
    x = torch.randn(1, 3, 32, 32)
    assert loaded.caption(x, max_new_tokens=4) == model.eval().caption(x, max_new_tokens=4)
    # A second stage may add the loss to a model saved without it, or drop it.
    plain = VisionLanguageModel.from_config(tiny_config(), corpus=CAPTIONS)
    plain.save_pretrained(tmp_path / "without")
    staged = VisionLanguageModel.from_config(tiny_config(image_word_loss=1.0, init_from=str(tmp_path / "without")))
    assert hasattr(staged, "image_words")
    dropped = VisionLanguageModel.from_config(tiny_config(init_from=str(tmp_path / "with")))
    assert not hasattr(dropped, "image_words")
    # Anything else missing is still an error that names the file.
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "with" / "model.safetensors")
    weights.pop(next(k for k in weights if k.startswith("projector.")))
    save_file(weights, tmp_path / "with" / "model.safetensors")
    with pytest.raises(RuntimeError, match=r"model\.safetensors: weights do not match the model: missing \['projector"):
        VisionLanguageModel.from_pretrained(tmp_path / "with")
