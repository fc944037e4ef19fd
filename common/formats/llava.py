"""LLaVA / ShareGPT JSON: a `.json` list (or `.jsonl`) of

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg" | [path, ...],
     "conversations": [{"from": "system" | "human" | "gpt", "value": "<image>\\nWhat ..."}, ...]}

`<image>` placeholders in the human messages, one per image, in order; a record without `image` is text-only.
"""

from __future__ import annotations

from ..data import Sample
from .conversation import (
    ASSISTANT,
    SYSTEM,
    USER,
    ConversationFormat,
    Message,
    RecordError,
    ResolveImage,
    Syntax,
    build_sample,
)

PLACEHOLDER = "<image>"
ROLES = {"system": SYSTEM, "human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}
SYNTAX = Syntax("conversations", PLACEHOLDER, {SYSTEM: "system", USER: "human", ASSISTANT: "gpt"})


def matches(record: dict) -> bool:
    turns = record.get("conversations")
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


def read(record: dict, default_id: str, resolve: ResolveImage) -> Sample:
    entries = record.get("conversations")
    if not isinstance(entries, list) or not entries:
        raise RecordError("'conversations' must be a non-empty list of {\"from\", \"value\"} messages")
    messages = []
    for number, entry in enumerate(entries):
        where = f"conversations[{number}]"
        if not isinstance(entry, dict) or entry.get("from") not in ROLES or not isinstance(entry.get("value"), str):
            raise RecordError(f"{where} must be {{\"from\": \"human\" | \"gpt\" | \"system\", \"value\": text}}, "
                              f"got {entry!r:.100}")
        messages.append(Message(ROLES[entry["from"]], tuple(entry["value"].split(PLACEHOLDER)), where))
    images = record.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise RecordError("'image' must be a path or a list of paths")
    return build_sample(str(record.get("id", default_id)), messages, SYNTAX, [resolve(image) for image in images])


FORMAT = ConversationFormat(
    "LLaVA/ShareGPT", '{"image": ..., "conversations": [{"from": "human" | "gpt", "value": "..."}]}', matches, read
)
