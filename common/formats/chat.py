"""Chat messages, the transformers / TRL convention: a `.jsonl` (or `.json` list) of, or dataset rows with,

    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": "text" | [{"type": "image"}, {"type": "text", "text": "What ..."}]}],
     "images": [path, ...], "id": "optional"}

Each `{"type": "image"}` item is the next of `images`; a content list's text items are joined as written. In
a dataset, `images` may hold PIL images (an `Image` feature) instead of paths.
"""

from __future__ import annotations

from typing import Any

from ..data import Sample
from .conversation import Message, RecordError, ResolveImage, Role, Syntax, build_sample, entries

SYNTAX = Syntax("messages", '{"type": "image"}')


def matches(record: dict) -> bool:
    return isinstance(record.get("messages"), list)


def read(record: dict, default_id: str, resolve: ResolveImage, answered: bool = True) -> Sample:
    messages = read_messages(record, "messages")
    images = record.get("images") or []
    if not isinstance(images, list):
        raise RecordError("'images' must be a list")
    return build_sample(str(record.get("id") or default_id), messages, SYNTAX, [resolve(image) for image in images],
                        answered)


def read_messages(record: dict, key: str) -> list[Message]:
    """The record's list `key` of `{"role", "content"}` messages (TRL's preference files use them too)."""
    messages = []
    for where, entry in entries(record, key, '{"role", "content"} messages'):
        if not isinstance(entry, dict) or entry.get("role") not in (Role.SYSTEM, Role.USER, Role.ASSISTANT):
            raise RecordError(f"{where} must be {{\"role\": \"system\" | \"user\" | \"assistant\", \"content\": ...}}, "
                              f"got {entry!r:.100}")
        messages.append(Message(entry["role"], _pieces(entry.get("content"), where), where))
    return messages


def _pieces(content: Any, where: str) -> tuple[str, ...]:
    """Text or a list of text and image items -> the text split at the image items."""
    if isinstance(content, str):
        return (content,)
    if not isinstance(content, list):
        raise RecordError(f"{where}: 'content' must be text or a list of {{\"type\": \"text\" | \"image\"}} items")
    pieces = [""]
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            pieces.append("")
        elif kind == "text" and isinstance(item.get("text"), str):
            pieces[-1] += item["text"]
        else:
            raise RecordError(f"{where}: content items must be {{\"type\": \"text\", \"text\": ...}} or "
                              f"{{\"type\": \"image\"}}, got {item!r:.100}")
    return tuple(pieces)


NAME = "chat messages"  # as error messages and docs/data.md call it
SHAPE = '{"messages": [{"role": "user" | "assistant", "content": ...}], "images": [...]}'  # a record, for the error on a file of no known format
