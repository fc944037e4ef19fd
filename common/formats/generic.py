"""The generic format (the recipe's, as convert_ucf101.py writes it): one record per JSON line,

    {"id": "val-0000000300", "system": "optional", "conversations": [{"images": ["val/x.0.jpg", ...],
     "user": "Classify the video ...", "assistant": "BabyCrawling"}, ...]}

Each turn lists its own images; they lead the turn (`{tags}\\n{text}`) unless the text places them with
`<|image_1|>`, `<|image_2|>`, ... tags, one per image in order.
"""

from __future__ import annotations

from ..data import Sample, Turn
from ..phi3v.processing_phi3_v import IMAGE_TAG
from .conversation import Message, RecordError, ResolveImage, Role, Syntax, build_sample, entries, first_entry

SYNTAX = Syntax("conversations", "<|image_k|>")


def matches(record: dict) -> bool:
    first = first_entry(record, "conversations")
    return isinstance(first, dict) and "user" in first


def read(record: dict, default_id: str, resolve: ResolveImage, answered: bool = True) -> Sample:
    messages = [] if record.get("system") is None else [Message(Role.SYSTEM, (str(record["system"]),), "system")]
    turns = entries(record, "conversations", '{"images", "user", "assistant"} turns')
    for number, (where, turn) in enumerate(turns, start=1):
        question = not answered and number == len(turns) and isinstance(turn, dict) and "assistant" not in turn
        if not isinstance(turn, dict) or "user" not in turn or ("assistant" not in turn and not question):
            raise RecordError(f"{where} must be an object with 'user' and 'assistant'")
        images = turn.get("images", [])
        if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
            raise RecordError(f"{where}: 'images' must be a list of paths")
        user = Message(Role.USER, _pieces(str(turn["user"]), where), f"{where}.user", [resolve(image) for image in images])
        messages.append(user)
        if not question:
            messages.append(Message(Role.ASSISTANT, (str(turn["assistant"]),), f"{where}.assistant"))
    return build_sample(str(record.get("id", default_id)), messages, SYNTAX, answered=answered)


def conversation_record(sample_id: str, source: str, turns: list[Turn]) -> dict:
    """One record of the generic format, as `read` reads it back (what convert_ucf101.py writes)."""
    return {
        "id": sample_id,
        "source": source,
        "conversations": [{"images": list(turn.images), "user": turn.user, "assistant": turn.assistant} for turn in turns],
    }


def _pieces(text: str, where: str) -> tuple[str, ...]:
    """The text split at its `<|image_k|>` tags, which must be 1, 2, ... in order."""
    parts = IMAGE_TAG.split(text)
    numbers = [int(part) for part in parts[1::2]]
    if numbers != list(range(1, len(numbers) + 1)):
        tags = ", ".join(f"<|image_{number}|>" for number in numbers)
        raise RecordError(f"{where}.user: image tags {tags}; they must be <|image_1|>, <|image_2|>, ... in order, "
                          "one per image of the turn")
    return tuple(parts[::2])


NAME = "generic"  # as error messages and docs/data.md call it
SHAPE = '{"conversations": [{"images": [...], "user": "...", "assistant": "..."}]}'  # a record, for the error on a file of no known format
