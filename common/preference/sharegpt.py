"""LLaMA-Factory's sharegpt preference records (its `ranking: true` datasets): a `.json` list (or `.jsonl`) of

    {"conversations": [{"from": "human", "value": "<image>What ..."}, ...],
     "chosen": {"from": "gpt", "value": "..."}, "rejected": {"from": "gpt", "value": "..."},
     "images": [path, ...], "system": "optional", "id": "optional"}

The conversation ends with the question; `<image>` placeholders as in LLaVA/ShareGPT (common/formats/llava.py).
"""

from __future__ import annotations

from ..formats import llava
from ..formats.conversation import Message, RecordError, ResolveImage, Role, entries
from .pairs import PreferencePair, answer_text, build_pair, image_list


def matches(record: dict) -> bool:
    return isinstance(record.get("conversations"), list) and isinstance(record.get("chosen"), dict)


def read(record: dict, default_id: str, resolve: ResolveImage) -> PreferencePair:
    system = record.get("system")
    messages = [] if not system else [Message(Role.SYSTEM, (str(system),), "system")]
    messages += [llava.message(where, entry) for where, entry in entries(record, "conversations", '{"from", "value"} messages')]
    answers = []
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), dict):
            raise RecordError(f"'{key}' must be a {{\"from\": \"gpt\", \"value\": text}} message")
        answers.append(answer_text(llava.message(key, record[key]), key, llava.SYNTAX))
    images = [resolve(image) for image in image_list(record, ("images",))]
    return build_pair(str(record.get("id") or default_id), messages, llava.SYNTAX, images, *answers)


NAME = "LLaMA-Factory sharegpt preference"  # as error messages and the docs call it
SHAPE = ('{"conversations": [{"from": "human", "value": "<image>..."}], "chosen": {"from": "gpt", "value": ...}, '
         '"rejected": {...}, "images": [...]}')
