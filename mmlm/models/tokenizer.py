"""Byte-level BPE tokenizers trained on a caption corpus (any UTF-8 text, Chinese included)."""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str], *,
                        wrap: tuple[str, str] | None = None, **roles: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``; ``special_tokens`` take the first ids, in order.

    ``wrap=(bos, eos)`` adds those tokens around every encoded text; ``roles`` name the special
    tokens' jobs for transformers (``eos_token=...``, ``pad_token=...``, ``bos_token=...``).
    """
    tok = Tokenizer(models.BPE())
    # Each Han character is its own pre-token (as BERT does): Chinese has no spaces, and merges across word
    # boundaries ("一个大圆" + "形是") would spell the same word differently in a caption and in a question.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    if wrap is not None:
        bos, eos = wrap
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
