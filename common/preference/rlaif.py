"""RLAIF-V's flat rows (openbmb/RLAIF-V-Dataset): a `.jsonl` (or `.json` list) of, or dataset rows with,

    {"question": "What ...", "chosen": "...", "rejected": "...", "image": path | embedded image, "idx": optional}

The image leads the question (`<|image_1|>\\n{question}`), or stands at an `<image>` placeholder in it. Other
columns (ds_name, origin_dataset, ...) are ignored.
"""

from __future__ import annotations

from ..formats.conversation import ResolveImage, Syntax
from .pairs import IMAGE_PLACEHOLDER, PreferencePair, build_pair, image_list, plain_answer, question_messages

SYNTAX = Syntax("question", IMAGE_PLACEHOLDER)


def matches(record: dict) -> bool:
    return "question" in record and "chosen" in record


def read(record: dict, default_id: str, resolve: ResolveImage) -> PreferencePair:
    images = [resolve(image) for image in image_list(record, ("image",))]
    messages, images = question_messages(record["question"], "question", images)
    sample_id = record.get("idx", record.get("id"))
    return build_pair(default_id if sample_id is None else str(sample_id), messages, SYNTAX, images,
                      plain_answer(record.get("chosen"), "chosen"), plain_answer(record.get("rejected"), "rejected"))


NAME = "RLAIF-V"  # as error messages and the docs call it
SHAPE = '{"question": "...", "chosen": "...", "rejected": "...", "image": ...}'
