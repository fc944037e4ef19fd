"""TRL's preference records: a `.jsonl` (or `.json` list) of, or dataset rows with,

    {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What ..."}]}] | "text",
     "chosen": [{"role": "assistant", "content": "..."}] | "text", "rejected": ... (as chosen),
     "images": [path, ...] (or "image": path), "id": "optional"}

A prompt of chat messages places its images as chat messages do (common/formats/chat.py); a prompt of plain
text at its `<image>` placeholders, or leading it when it has none.
"""

from __future__ import annotations

from ..formats import chat
from ..formats.conversation import RecordError, ResolveImage, Syntax
from .pairs import (
    IMAGE_PLACEHOLDER,
    PreferencePair,
    answer_text,
    build_pair,
    image_list,
    plain_answer,
    question_messages,
)

MESSAGES_SYNTAX = Syntax("prompt", '{"type": "image"}')
TEXT_SYNTAX = Syntax("prompt", IMAGE_PLACEHOLDER)


def matches(record: dict) -> bool:
    return "prompt" in record and "chosen" in record


def read(record: dict, default_id: str, resolve: ResolveImage) -> PreferencePair:
    images = [resolve(image) for image in image_list(record, ("images", "image"))]
    if isinstance(record["prompt"], list):
        messages, syntax = chat.read_messages(record, "prompt"), MESSAGES_SYNTAX
    else:
        (messages, images), syntax = question_messages(record["prompt"], "prompt", images), TEXT_SYNTAX
    return build_pair(str(record.get("id") or default_id), messages, syntax, images, _answer(record, "chosen"),
                      _answer(record, "rejected"))


def _answer(record: dict, key: str) -> str:
    """Plain text, or one assistant message (TRL's conversational form)."""
    if not isinstance(record.get(key), list):
        return plain_answer(record.get(key), key)
    messages = chat.read_messages(record, key)
    if len(messages) != 1:
        raise RecordError(f"'{key}' must hold one assistant message, got {len(messages)}")
    return answer_text(messages[0], key, MESSAGES_SYNTAX)


NAME = "TRL preference"  # as error messages and the docs call it
SHAPE = '{"prompt": [{"role": "user", "content": ...}] | "text", "chosen": ..., "rejected": ..., "images": [...]}'
