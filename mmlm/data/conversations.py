"""Conversation data: LLaVA JSON / JSONL and the Hugging Face chat form, normalised into one shape.

Both forms become a ``Conversation``: ``images`` (paths, relative to the data file unless ``image_root`` is
given) and ``messages``, each ``{"role": "system" | "user" | "assistant", "content": text}`` where every image
stands as an ``<image>`` marker in the text, in order.

- LLaVA: ``{"image": "a.jpg" | [...], "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}``; ``from`` is human / gpt / system (user / assistant are accepted too).
- HF chat: ``{"images": [...], "messages": [{"role": "user", "content": [{"type": "image"},
  {"type": "text", "text": "..."}]}, ...]}``; ``content`` may be a plain string; an image part may name its
  file itself (``{"type": "image", "image": "a.jpg"}``) when the row has no ``images`` list.

A file is a JSON array of rows (LLaVA's own form) or JSONL. Every bad row raises ``DataError`` naming the file,
its line and its image file(s): an ``<image>`` count that does not match the images, no assistant turn, an
unknown role, an empty message, a missing image file. Under ``on_bad_row="skip"`` bad rows are left out and
listed in ``ConversationSet.skipped`` as ``{"source", "image", "reason"}``.

``ConversationDataset`` decodes the images of each conversation safely (``on_bad_image`` as for captions);
``collate_conversations`` batches its items, one or several images each (up to the model's ``max_images``).
``caption_conversation`` turns a plain caption record (with its optional per-sample ``prompt``) into the same
form, so caption manifests and conversations train through one path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from .datasets import BAD_IMAGE_POLICIES, SkipLog, WorkerProgress
from .images import DEFAULT_MAX_PIXELS, BadImageError, load_image
from .sources import DataError, Record, _check_unicode, _decode_utf8, _resolve_image

IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
BAD_ROW_POLICIES = ("error", "skip")
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Conversation:
    """Images and messages of one sample; ``content`` holds one ``<image>`` marker per image, in order."""

    images: list[Any]
    messages: list[dict[str, str]]
    source: str = ""  # "chat.jsonl:12"
    id: str | None = None

    @property
    def num_images(self) -> int:
        return len(self.images)


@dataclass
class ConversationSet:
    """What ``read_conversations`` found: the good conversations and the skipped rows (``on_bad_row="skip"``)."""

    conversations: list[Conversation]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source", "image", "reason"}


class BadRowError(DataError):
    """A conversation row that cannot be used; ``.source`` (file:line), ``.image`` and ``.reason`` say which, why."""

    def __init__(self, source: str, reason: str, image: str = ""):
        self.source, self.reason, self.image = source, reason, image
        super().__init__(f"{source}{f' ({image})' if image else ''}: {reason}")


# ----------------------------------------------------------------------------- one row


def _images_named(row: dict) -> str:
    """The image file name(s) a row names, for error messages (best effort: the row may be malformed)."""
    value = row.get("image", row.get("images"))
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ", ".join(v for v in value if isinstance(v, str))
    return ""


def _string_list(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"'{key}' must be a path or a list of paths, got {value!r:.80}")


def _llava_messages(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'conversations' must be a non-empty list of {{'from', 'value'}} turns, got {turns!r:.80}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{i}]: expected an object with 'from' and 'value', got {turn!r:.80}")
        role = _LLAVA_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise ValueError(f"conversations[{i}]: unknown role {turn['from']!r}; expected one of "
                             f"{', '.join(_LLAVA_ROLES)}")
        if not isinstance(turn["value"], str):
            raise ValueError(f"conversations[{i}]: 'value' must be a string, got {type(turn['value']).__name__}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _hf_content(content: Any, where: str, inline_images: list[str]) -> str:
    """HF content (a string or a list of parts) -> text with ``<image>`` markers; collects inline image paths."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: 'content' must be a string or a list of parts, got {type(content).__name__}")
    pieces = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            path = part.get("image", part.get("path", part.get("url")))
            if isinstance(path, str):
                inline_images.append(path)
            pieces.append(IMAGE_TOKEN + "\n")
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise ValueError(f"{where}.content[{j}]: expected {{'type': 'image'}} or {{'type': 'text', 'text': ...}}, "
                             f"got {part!r:.80}")
    return "".join(pieces).rstrip()


def _hf_messages(messages: Any, inline_images: list[str]) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of {{'role', 'content'}}, got {messages!r:.80}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}]: expected an object with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {message['role']!r}; expected one of {', '.join(ROLES)}")
        out.append({"role": message["role"], "content": _hf_content(message["content"], f"messages[{i}]",
                                                                      inline_images)})
    return out


def _validate(messages: list[dict[str, str]], n_images: int) -> None:
    for i, message in enumerate(messages):
        text = message["content"].replace(IMAGE_TOKEN, "").strip()
        if not text and (message["role"] != "user" or IMAGE_TOKEN not in message["content"]):
            raise ValueError(f"message {i} ({message['role']}) is empty")
        if IMAGE_TOKEN in message["content"] and message["role"] != "user":
            raise ValueError(f"message {i} ({message['role']}) holds an {IMAGE_TOKEN} marker; images go in user turns")
    markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if markers != n_images:
        raise ValueError(f"{markers} {IMAGE_TOKEN} marker(s) in the text but {n_images} image(s)")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to learn from (roles: "
                         f"{', '.join(m['role'] for m in messages)})")


def parse_conversation(row: Any, where: str, *, image_root: Path | None = None,
                       allow_absolute_paths: bool = False, check_files: bool = True) -> Conversation:
    """One LLaVA or HF-chat row -> a ``Conversation``; a ``BadRowError`` naming ``where`` and its images."""
    if not isinstance(row, dict):
        raise BadRowError(where, f"expected a JSON object, got {type(row).__name__}")
    image = _images_named(row)
    try:
        _check_unicode(row, where)
        inline: list[str] = []
        if "conversations" in row:
            messages = _llava_messages(row["conversations"])
            images = _string_list(row["image"], "image") if row.get("image") is not None else []
        elif "messages" in row:
            messages = _hf_messages(row["messages"], inline)
            images = _string_list(row["images"], "images") if row.get("images") is not None else inline
            image = image or ", ".join(images)
        else:
            raise ValueError(f"expected 'conversations' (LLaVA) or 'messages' (HF chat); found keys: "
                             f"{', '.join(map(str, row)) or 'none'}")
        _validate(messages, len(images))
        paths = [_resolve_image(v, image_root, where, allow_absolute_paths, check_files) for v in images] \
            if image_root is not None else images
    except (ValueError, DataError) as err:
        reason = str(err)
        if isinstance(err, DataError) and reason.startswith(where + ": "):  # _resolve_image names the row itself
            reason = reason[len(where) + 2:]
        raise BadRowError(where, reason, image) from None
    row_id = row.get("id")
    return Conversation(images=paths, messages=messages, source=where, id=None if row_id is None else str(row_id))


# ----------------------------------------------------------------------------- files


def _json_rows(text: str, path: Path) -> Iterator[tuple[int, Any | DataError]]:
    """(line, row) for a JSON array (line of each element's start) or JSONL (one row per line)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        decoder = json.JSONDecoder()
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                yield text.count("\n") + 1, DataError(f"{path}: JSON array is not closed with ']'")
                return
            if text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                row, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                yield err.lineno, DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})")
                return
            yield line, row
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            yield lineno, DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})")


def scan_conversations(path: str | Path, *, image_root: str | Path | None = None, allow_absolute_paths: bool = False,
                       check_files: bool = True) -> Iterator[Conversation | DataError]:
    """Every row of a LLaVA / HF-chat JSON or JSONL file, as a Conversation or the error it raised."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: conversation file not found")
    root = Path(image_root) if image_root is not None else path.parent
    for line, row in _json_rows(_decode_utf8(path.read_bytes(), path), path):
        if isinstance(row, DataError):
            yield row
            continue
        try:
            yield parse_conversation(row, f"{path.name}:{line}", image_root=root,
                                     allow_absolute_paths=allow_absolute_paths, check_files=check_files)
        except BadRowError as err:
            yield err


def read_conversations(path: str | Path, *, on_bad_row: str = "error", image_root: str | Path | None = None,
                       allow_absolute_paths: bool = False, check_files: bool = True) -> ConversationSet:
    """All conversations of a file; the first bad row raises, or (``on_bad_row="skip"``) every bad row is listed."""
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row: expected 'error' or 'skip', got {on_bad_row!r}")
    found = ConversationSet([])
    for item in scan_conversations(path, image_root=image_root, allow_absolute_paths=allow_absolute_paths,
                                   check_files=check_files):
        if isinstance(item, Conversation):
            found.conversations.append(item)
        elif not isinstance(item, BadRowError):
            raise item  # a file that does not parse as JSON is not a row to skip
        elif on_bad_row == "error":
            raise BadRowError(f"{Path(path).parent}/{item.source}", item.reason, item.image)
        else:
            found.skipped.append({"source": item.source, "image": item.image, "reason": item.reason})
    if not found.conversations:
        raise DataError(f"{path}: no usable conversation"
                        + (f" ({len(found.skipped)} bad rows, first: {found.skipped[0]})" if found.skipped else ""))
    return found


# ----------------------------------------------------------------------------- captions as conversations


def record_prompt(record: Record) -> str | None:
    """The per-sample ``prompt`` column of a caption manifest (kept in the record's attributes), or None."""
    prompt = record.attributes.get("prompt")
    if prompt is None:
        return None
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{record.source}: 'prompt' must be a non-empty string, got {prompt!r:.80}")
    return prompt


def caption_conversation(record: Record, caption: str, default_prompt: str = "") -> Conversation:
    """A caption record as one user turn (``<image>`` + its prompt, else ``default_prompt``) and the caption."""
    prompt = record_prompt(record)
    prompt = default_prompt if prompt is None else prompt
    user = IMAGE_TOKEN + ("\n" + prompt if prompt else "")
    return Conversation(images=[record.image], messages=[{"role": "user", "content": user},
                                                         {"role": "assistant", "content": caption}],
                        source=record.source)


# ----------------------------------------------------------------------------- dataset


class ConversationDataset(Dataset):
    """Map-style dataset over Conversations; images decoded safely, messages passed through.

    Items: ``{"pixel_values": [one transformed image per <image> marker, in order], "messages", "num_images",
    "source", "index"}``. Under ``on_bad_image="skip"`` a conversation with a bad image is replaced by the next
    good one (length and sampler stay valid) and listed in ``skipped`` as ("row (file)", reason); under "error"
    the first bad image raises a BadImageError naming the file and the row.
    """

    def __init__(self, conversations: Sequence[Conversation], transform: Callable | None = None,
                 on_bad_image: str = "error", max_pixels: int = DEFAULT_MAX_PIXELS, *, max_images: int | None = None):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image: expected 'error' or 'skip', got {on_bad_image!r}")
        if max_images is not None:
            over = [c for c in conversations if c.num_images > max_images]
            if over:
                raise DataError(f"{over[0].source}: {over[0].num_images} images, more than max_images={max_images} "
                                f"({len(over)} conversation(s) over the limit)")
        self.conversations, self.transform = conversations, transform
        self.on_bad_image, self.max_pixels = on_bad_image, max_pixels
        self._bad: set[int] = set()
        self._log = SkipLog()
        self.worker_progress = WorkerProgress()

    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Every skipped conversation as (source with its bad file, reason), from all worker processes."""
        return self._log.entries()

    def _decode(self, conv: Conversation) -> list[Any]:
        self.worker_progress.start(f"{conv.source} ({', '.join(map(str, conv.images))})")
        return [load_image(image, max_pixels=self.max_pixels) for image in conv.images]

    def __getitem__(self, index: int) -> dict:
        n = len(self.conversations)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} conversations")
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            conv = self.conversations[i]
            try:
                images = self._decode(conv)
            except BadImageError as err:
                if self.on_bad_image == "error":
                    raise BadImageError(err.path, f"{err.reason} (row {conv.source})") from None
                self._bad.add(i)
                self._log.add(f"{conv.source} ({err.path})", err.reason)
                continue
            self.worker_progress.done()
            pixels = [self.transform(image) for image in images] if self.transform else images
            return {"pixel_values": pixels, "messages": [dict(m) for m in conv.messages],
                    "num_images": len(images), "source": conv.source, "index": i}
        raise DataError(f"every one of the {n} conversations has a bad image; first skipped: {self.skipped[:3]}")


def collate_conversations(samples: list[dict]) -> dict:
    """A batch of conversation items: every key a list, except ``pixel_values``.

    Every sample with one image (a tensor, or a list of one): ``pixel_values`` is their stack, one row per
    sample, and there is no ``image_counts`` (the single-image path). Otherwise ``pixel_values`` holds all
    images of the batch flattened in sample order (stacked when they are tensors; None when there are none)
    and ``image_counts[i]`` says how many are sample i's.
    """
    if not samples:
        raise ValueError("collate_conversations: an empty batch")
    out = {key: [item[key] for item in samples] for key in samples[0]}
    groups = [list(p) if isinstance(p, (list, tuple)) else [p] for p in out["pixel_values"]]
    counts = [len(g) for g in groups]
    images = [image for group in groups for image in group]
    stack = bool(images) and all(isinstance(image, torch.Tensor) for image in images)
    out["pixel_values"] = torch.stack(images) if stack else images or None
    if any(count != 1 for count in counts):
        out["image_counts"] = counts
    return out


__all__ = ["BAD_ROW_POLICIES", "BadRowError", "Conversation", "ConversationDataset", "ConversationSet", "IMAGE_TOKEN",
           "ROLES",
           "caption_conversation", "collate_conversations", "parse_conversation", "read_conversations",
           "record_prompt", "scan_conversations"]
