"""A preference pair: a conversation up to its last question, and a preferred (`chosen`) and a dispreferred
(`rejected`) answer to it. The prompt is read with the conversation formats' rules (common/formats/
conversation.py: roles, system message, image placement), so it is the supervised prompt of the same
conversation: the same tokens, the same images."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..data import Sample
from ..formats.conversation import Message, RecordError, Role, Syntax, build_sample

IMAGE_PLACEHOLDER = "<image>"  # in the text of a prompt written as plain text (TRL, RLAIF-V)


@dataclass
class PreferencePair(Sample):
    """`turns` hold the conversation, its last answer empty; `chosen` and `rejected` answer its last question.
    A Sample, so that datasets open its images as they do a sample's."""

    chosen: str = field(default="", kw_only=True)
    rejected: str = field(default="", kw_only=True)

    def answered(self, answer: str) -> Sample:
        """The supervised sample of the conversation with `answer` as its last answer."""
        turns = [*self.turns[:-1], replace(self.turns[-1], assistant=answer)]
        return Sample(self.id, turns, [answer], self.bare_text_turns, self.system)


def build_pair(sample_id: str, messages: list[Message], syntax: Syntax, images: list[Any] | None,
               chosen: str, rejected: str) -> PreferencePair:
    """The pair of a prompt conversation (ending in the question) and its two answers; `images` as for
    `build_sample` (None when the question's message lists its own)."""
    if not messages or messages[-1].role != Role.USER:
        where = messages[-1].where if messages else syntax.messages_key
        raise RecordError(f"{where}: the prompt must end with a {syntax.name(Role.USER)} message, the question both "
                          "answers reply to")
    sample = build_sample(sample_id, messages, syntax, images, answered=False)
    return PreferencePair(sample.id, sample.turns, [chosen], system=sample.system, chosen=chosen, rejected=rejected)


def answer_text(message: Message, key: str, syntax: Syntax) -> str:
    """The text of an answer given as a message: an assistant message without images, not empty."""
    if message.role != Role.ASSISTANT:
        raise RecordError(f"'{key}' must be an answer (a {syntax.name(Role.ASSISTANT)!r} message), got a "
                          f"{syntax.name(message.role)!r} message")
    if message.placeholders:
        raise RecordError(f"'{key}': an image placeholder {syntax.placeholder} in an answer; images belong to the prompt")
    return plain_answer(message.pieces[0], key)


def plain_answer(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"'{key}' must be a non-empty text, got {value!r:.100}")
    return value


def question_messages(text: Any, key: str, images: list[Any]) -> tuple[list[Message], list[Any] | None]:
    """A prompt written as plain text: one user message, its images at its `<image>` placeholders, or leading it
    (`{tags}\\n{text}`) when it has none. -> (messages, images for `build_pair`)."""
    if not isinstance(text, str) or not text.strip():
        raise RecordError(f"'{key}' must be a non-empty text, got {text!r:.100}")
    pieces = tuple(text.split(IMAGE_PLACEHOLDER))
    if len(pieces) > 1:
        return [Message(Role.USER, pieces, key)], images
    return [Message(Role.USER, pieces, key, images)], None


def image_list(record: dict, keys: tuple[str, ...]) -> list[Any]:
    """The record's images under the first of `keys` present: one entry or a list (paths, or a dataset's
    embedded images)."""
    present = [key for key in keys if record.get(key) is not None]
    if len(present) > 1:
        raise RecordError(f"give the images under one key, not {' and '.join(repr(key) for key in present)}")
    if not present:
        return []
    images = record[present[0]]
    return list(images) if isinstance(images, list | tuple) else [images]
