"""LLaVA / ShareGPT JSON: a `.json` list (or `.jsonl`) of

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg" | [path, ...],
     "conversations": [{"from": "system" | "human" | "gpt", "value": "<image>\\nWhat ..."}, ...]}

`<image>` placeholders in the human messages, one per image, in order; a record without `image` is text-only.
"""

from __future__ import annotations

from ..data import Sample
from .conversation import Message, RecordError, ResolveImage, Role, Syntax, build_sample, entries, first_entry

PLACEHOLDER = "<image>"
ROLES = {"system": Role.SYSTEM, "human": Role.USER, "user": Role.USER, "gpt": Role.ASSISTANT, "assistant": Role.ASSISTANT}
SYNTAX = Syntax("conversations", PLACEHOLDER, {Role.SYSTEM: "system", Role.USER: "human", Role.ASSISTANT: "gpt"})


def matches(record: dict) -> bool:
    first = first_entry(record, "conversations")
    return isinstance(first, dict) and "from" in first


def read(record: dict, default_id: str, resolve: ResolveImage, answered: bool = True) -> Sample:
    messages = [message(where, entry) for where, entry in entries(record, "conversations", '{"from", "value"} messages')]
    images = record.get("image")
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise RecordError("'image' must be a path or a list of paths")
    return build_sample(str(record.get("id", default_id)), messages, SYNTAX, [resolve(image) for image in images],
                        answered)


def message(where: str, entry) -> Message:
    """One `{"from", "value"}` entry (LLaMA-Factory's preference files use them too)."""
    if not isinstance(entry, dict) or entry.get("from") not in ROLES or not isinstance(entry.get("value"), str):
        raise RecordError(f"{where} must be {{\"from\": \"human\" | \"gpt\" | \"system\", \"value\": text}}, "
                          f"got {entry!r:.100}")
    return Message(ROLES[entry["from"]], tuple(entry["value"].split(PLACEHOLDER)), where)


NAME = "LLaVA/ShareGPT"  # as error messages and docs/data.md call it
SHAPE = '{"image": ..., "conversations": [{"from": "human" | "gpt", "value": "..."}]}'  # a record, for the error on a file of no known format
