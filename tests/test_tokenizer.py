"""The byte-level BPE tokenizers mmlm trains on a caption corpus (mmlm.models.tokenizer)."""

from tokenizers import pre_tokenizers

from mmlm.config import ShapesConfig
from mmlm.data.shapes import generate_shapes
from mmlm.models.tokenizer import train_bpe_tokenizer

SPECIAL = dict(special_tokens=["<eos>", "<pad>"], eos_token="<eos>", pad_token="<pad>")


def pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_a_chinese_word_is_spelled_alike_in_captions_and_in_questions():
    # Chinese has no spaces: merges learned across word boundaries of the captions ("一个大圆" + "形是") would
    # spell "圆形" one way in a caption and another in "圆形是什么颜色？", which the corpus never saw.
    records = generate_shapes(200, split="train", config=ShapesConfig(language="zh", word_order="kind_colour"))
    tokenizer = train_bpe_tokenizer([c for r in records for c in r.captions], 400, **SPECIAL)
    caption = pieces(tokenizer, "左边一个大圆形是绿色的")
    assert caption == list("左边一个大圆形是绿色的")  # one token per character, none across characters
    assert pieces(tokenizer, "圆形是什么颜色？")[:2] == ["圆", "形"]
    assert tokenizer.decode(tokenizer("左边一个大圆形是绿色的，a circle")["input_ids"]) == "左边一个大圆形是绿色的，a circle"


def test_english_merges_are_those_of_plain_byte_level_bpe():
    records = generate_shapes(200, split="train")
    texts = [c for r in records for c in r.captions]
    tokenizer = train_bpe_tokenizer(texts, 400, **SPECIAL)
    plain = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ours = tokenizer.backend_tokenizer.pre_tokenizer
    for text in texts[:50] + ["what is the colour of the circle?", "  two  spaces\nand a newline"]:
        assert ours.pre_tokenize_str(text) == plain.pre_tokenize_str(text)
    assert pieces(tokenizer, "a large green circle") == ["a", " large", " green", " circle"]  # whole words merge
