"""Conversation data: LLaVA JSON / JSONL and HF chat rows into one form; bad rows named by file, line and image."""

import json

import pytest
from PIL import Image

from mmlm.data.conversations import (
    BadRowError,
    Conversation,
    ConversationDataset,
    caption_conversation,
    parse_conversation,
    read_conversations,
    record_prompt,
)
from mmlm.data.images import BadImageError
from mmlm.data.sources import DataError, Record


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "images" / name)
    return tmp_path


def llava(image, *turns):
    return {"id": "x", "image": image,
            "conversations": [{"from": who, "value": text} for who, text in turns]}


def chat(images, *messages):
    return {"images": images, "messages": [{"role": role, "content": content} for role, content in messages]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD_LLAVA = llava("images/a.png", ("human", "<image>\nWhat is this?"), ("gpt", "A red square."),
                   ("human", "And its colour?"), ("gpt", "Red."))
GOOD_CHAT = chat(["images/a.png", "images/b.png"],
                 ("system", "You are terse."),
                 ("user", [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same colour?"}]),
                 ("assistant", [{"type": "text", "text": "Yes."}]),
                 ("user", "Sure?"), ("assistant", "Yes."))


def test_llava_and_hf_chat_rows_normalise_to_one_form(folder):
    conv = parse_conversation(GOOD_LLAVA, "x.json:2", image_root=folder)
    assert conv.images == [(folder / "images/a.png").resolve()]
    assert conv.messages == [{"role": "user", "content": "<image>\nWhat is this?"},
                             {"role": "assistant", "content": "A red square."},
                             {"role": "user", "content": "And its colour?"},
                             {"role": "assistant", "content": "Red."}]
    assert conv.id == "x" and conv.source == "x.json:2"
    conv = parse_conversation(GOOD_CHAT, "c.jsonl:1", image_root=folder)
    assert conv.num_images == 2
    assert conv.messages[:3] == [{"role": "system", "content": "You are terse."},
                                 {"role": "user", "content": "<image>\n<image>\nSame colour?"},
                                 {"role": "assistant", "content": "Yes."}]
    # An image part may name its own file; without image_root the paths are kept as written.
    inline = chat(None, ("user", [{"type": "image", "image": "images/c.png"}, {"type": "text", "text": "Hi"}]),
                  ("assistant", "Hello"))
    assert parse_conversation(inline, "i.jsonl:1").images == ["images/c.png"]
    # A text-only conversation has no image and no marker.
    assert parse_conversation(llava(None, ("human", "Hi"), ("gpt", "Hello")), "t:1").images == []


def test_json_array_and_jsonl_files_name_the_line_of_each_row(folder):
    array = folder / "llava.json"
    array.write_text("[\n" + ",\n".join(json.dumps(r, indent=1) for r in [GOOD_LLAVA, GOOD_LLAVA]) + "\n]\n")
    found = read_conversations(array)
    second = 2 + len(json.dumps(GOOD_LLAVA, indent=1).splitlines())
    assert [c.source for c in found.conversations] == ["llava.json:2", f"llava.json:{second}"]
    jsonl = write_jsonl(folder / "chat.jsonl", [GOOD_CHAT, GOOD_LLAVA])
    found = read_conversations(jsonl)
    assert [c.source for c in found.conversations] == ["chat.jsonl:1", "chat.jsonl:2"]
    assert found.conversations[1].messages[-1] == {"role": "assistant", "content": "Red."}


BAD_ROWS = [
    (llava("images/a.png", ("human", "What is this?"), ("gpt", "A square.")),
     "0 <image> marker(s) in the text but 1 image(s)"),
    (chat(["images/a.png"], ("user", [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]),
          ("assistant", "x")), "2 <image> marker(s) in the text but 1 image(s)"),
    (llava("images/b.png", ("human", "<image>\nWhat is this?")), "no assistant turn"),
    (llava("images/b.png", ("human", "<image>\nHi"), ("bot", "Hello")), "unknown role 'bot'"),
    (chat(["images/c.png"], ("user", [{"type": "image"}]), ("model", "x")), "unknown role 'model'"),
    (llava("images/c.png", ("human", "<image>\nHi"), ("gpt", "  ")), "message 1 (assistant) is empty"),
    (llava("images/missing.png", ("human", "<image>\nHi"), ("gpt", "Hello")), "image file not found"),
    ({"image": "images/a.png", "caption": "no conversation"}, "expected 'conversations' (LLaVA) or 'messages'"),
]


@pytest.mark.parametrize("row, reason", BAD_ROWS)
def test_each_bad_row_is_a_clear_error_naming_file_line_and_image(folder, row, reason):
    path = write_jsonl(folder / "data.jsonl", [GOOD_LLAVA, row])
    with pytest.raises(BadRowError) as info:
        read_conversations(path)
    message = str(info.value)
    assert message.startswith(f"{folder / 'data.jsonl'}:2 (")
    assert reason in message
    assert (row.get("image") or row["images"][0]) in message


def test_skip_policy_lists_every_bad_row_with_its_image(folder):
    rows = [GOOD_LLAVA] + [row for row, _ in BAD_ROWS] + [GOOD_CHAT]
    found = read_conversations(write_jsonl(folder / "data.jsonl", rows), on_bad_row="skip")
    assert len(found.conversations) == 2
    assert [s["source"] for s in found.skipped] == [f"data.jsonl:{i}" for i in range(2, 2 + len(BAD_ROWS))]
    for skipped, (row, reason) in zip(found.skipped, BAD_ROWS):
        assert reason in skipped["reason"]
        assert skipped["image"] == (row.get("image") or row["images"][0])
    assert "data.jsonl:8" not in found.skipped[0]["reason"]  # the reason does not repeat the row


def test_file_level_problems_are_not_skipped(folder):
    broken = folder / "broken.jsonl"
    broken.write_text(json.dumps(GOOD_LLAVA) + "\n{not json\n")
    with pytest.raises(DataError, match="broken.jsonl:2: invalid JSON"):
        read_conversations(broken, on_bad_row="skip")
    with pytest.raises(DataError, match="no usable conversation"):
        read_conversations(write_jsonl(folder / "bad.jsonl", [BAD_ROWS[0][0]]), on_bad_row="skip")
    with pytest.raises(ValueError, match="on_bad_row"):
        read_conversations(broken, on_bad_row="ignore")
    with pytest.raises(DataError, match="not found"):
        read_conversations(folder / "nope.jsonl")


def test_caption_records_with_a_prompt_column_become_conversations():
    plain = Record(image="a.png", captions=["a cat"], source="m.jsonl:1")
    asked = Record(image="b.png", captions=["two"], attributes={"prompt": "How many cats?"}, source="m.jsonl:2")
    assert record_prompt(plain) is None and record_prompt(asked) == "How many cats?"
    conv = caption_conversation(asked, "two", default_prompt="Describe the image.")
    assert isinstance(conv, Conversation) and conv.images == ["b.png"]
    assert conv.messages == [{"role": "user", "content": "<image>\nHow many cats?"},
                             {"role": "assistant", "content": "two"}]
    assert caption_conversation(plain, "a cat").messages[0] == {"role": "user", "content": "<image>"}
    assert caption_conversation(plain, "a cat", "Describe.").messages[0]["content"] == "<image>\nDescribe."
    with pytest.raises(DataError, match="m.jsonl:3: 'prompt' must be a non-empty string"):
        record_prompt(Record(image="c.png", captions=["x"], attributes={"prompt": ""}, source="m.jsonl:3"))


def test_conversation_dataset_decodes_images_and_skips_bad_ones_naming_the_file(folder):
    (folder / "images" / "zero.png").write_bytes(b"")
    rows = [GOOD_CHAT, llava("images/zero.png", ("human", "<image>\nHi"), ("gpt", "Hello")), GOOD_LLAVA,
            llava(None, ("human", "Just text"), ("gpt", "Fine"))]
    found = read_conversations(write_jsonl(folder / "d.jsonl", rows))
    dataset = ConversationDataset(found.conversations, transform=lambda im: im.size, on_bad_image="skip")
    items = [dataset[i] for i in range(len(dataset))]
    assert [item["source"] for item in items] == ["d.jsonl:1", "d.jsonl:3", "d.jsonl:3", "d.jsonl:4"]
    assert items[0]["pixel_values"] == [(4, 4), (4, 4)] and items[0]["num_images"] == 2
    assert items[0]["messages"][1] == {"role": "user", "content": "<image>\n<image>\nSame colour?"}
    assert items[3]["pixel_values"] == [] and items[3]["num_images"] == 0
    assert dataset.skipped == [(f"d.jsonl:2 ({(folder / 'images' / 'zero.png').resolve()})", "empty file (0 bytes)")]
    with pytest.raises(BadImageError, match=r"zero\.png: empty file \(0 bytes\) \(row d.jsonl:2\)"):
        ConversationDataset(found.conversations)[1]
    with pytest.raises(DataError, match=r"d.jsonl:1: 2 images, more than max_images=1"):
        ConversationDataset(found.conversations, max_images=1)
