"""What every conversation format shares: roles in order, where images go, and the resulting `Sample`.

A format's reader turns a record into `Message`s (a role and the text split at its image placeholders) and
the record's images; `build_sample` checks the conversation and places the images with one set of rules for
every format, so that a conversation gives the same tokens whichever format it is written in:
- placeholders that lead a user turn, with only whitespace around them, give the recipe's `{tags}\\n{text}`:
  the turn's tags concatenated (`<|image_1|><|image_2|>\\nWhat ...`), the text without the whitespace before it;
- a placeholder anywhere else: every placeholder of the turn becomes its tag where it stands, text unchanged;
- images are numbered from 1 in every turn and taken from the record's list in order;
- an optional system message first (Phi-3.5's `<|system|>`, never learnt), then user and assistant turns
  alternating, every user turn answered, no answer empty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..data import Sample, Turn
from ..phi3v.processing_phi3_v import IMAGE_TAG


class Role:
    """The roles of a conversation's messages, as chat templates name them."""

    SYSTEM, USER, ASSISTANT = "system", "user", "assistant"


class RecordError(Exception):
    """A record that cannot be a sample; whoever reads the file or dataset adds where it is."""


@dataclass(frozen=True)
class Message:
    role: str  # Role.SYSTEM, Role.USER or Role.ASSISTANT
    pieces: tuple[str, ...]  # the text split at its image placeholders: one more piece than placeholders
    where: str  # where it is in its record, for error messages: "conversations[2]"
    # Images listed with the turn (the generic format); None: the record's images, taken in placeholder order
    images: list[Any] | None = None

    @property
    def placeholders(self) -> int:
        return len(self.pieces) - 1


@dataclass(frozen=True)
class Syntax:
    """How a format writes what error messages name: its list of messages and its image placeholder."""

    messages_key: str  # "conversations", "messages"
    placeholder: str  # "<image>", '{"type": "image"}'
    role_names: dict[str, str] = field(default_factory=dict)  # our role -> the format's word, where it differs

    def name(self, role: str) -> str:
        return self.role_names.get(role, role)


# A record's image entry -> what `open_image` reads (a file path, or an embedded image as is); raises
# RecordError for an image file that is not there.
ResolveImage = Callable[[Any], Any]


@dataclass(frozen=True)
class ConversationFormat:
    name: str  # as error messages and docs/data.md call it
    shape: str  # what a record looks like, for the error on a file of no known format
    matches: Callable[[dict], bool]  # whether a record is in this format (from its keys alone)
    # record, its id if it has none, image resolver, and for conversations answered (False: the last question
    # may lack its answer); preference pairs (common/preference) are Samples too
    read: Callable[..., Sample]


def first_entry(record: dict, key: str) -> Any:
    """The first element of the record's list `key` (None if there is none): what format detection looks at."""
    entries = record.get(key)
    return entries[0] if isinstance(entries, list) and entries else None


def entries(record: dict, key: str, shape: str) -> list[tuple[str, Any]]:
    """(where, entry) for each element of the record's non-empty list `key` of `shape`s."""
    values = record.get(key)
    if not isinstance(values, list) or not values:
        raise RecordError(f"'{key}' must be a non-empty list of {shape}")
    return [(f"{key}[{number}]", value) for number, value in enumerate(values)]


def build_sample(sample_id: str, messages: list[Message], syntax: Syntax, images: list[Any] | None = None,
                 answered: bool = True) -> Sample:
    """The sample of a conversation; `images`: the record's images in placeholder order (None when every user
    message lists its own). `answered=False` (questions to predict): the last user message may be unanswered;
    its turn's answer is then empty."""
    first = 1 if messages and messages[0].role == Role.SYSTEM else 0
    question = not answered and len(messages) > first and messages[-1].role == Role.USER
    if question:
        messages = [*messages, Message(Role.ASSISTANT, ("",), messages[-1].where)]
    _check_roles(messages, syntax, first)
    if images is not None:
        messages = _images_by_placeholder(messages, images, syntax)
    last = len(messages) - 2
    turns = [_turn(messages[index], "" if question and index == last else _answer(messages[index + 1], syntax), syntax)
             for index in range(first, len(messages), 2)]
    return Sample(sample_id, turns, system=messages[0].pieces[0] if first else None)


def _check_roles(messages: list[Message], syntax: Syntax, first: int) -> None:
    if len(messages) <= first:
        raise RecordError(f"{syntax.messages_key}: no {syntax.name(Role.USER)} and {syntax.name(Role.ASSISTANT)} messages")
    if messages[first].role == Role.ASSISTANT:
        raise RecordError(
            f"{messages[first].where}: the conversation starts with an answer ({syntax.name(Role.ASSISTANT)}); it must "
            f"start with a {syntax.name(Role.USER)} message, after an optional {syntax.name(Role.SYSTEM)} message"
        )
    for index in range(first, len(messages)):
        message, expected = messages[index], Role.USER if (index - first) % 2 == 0 else Role.ASSISTANT
        if message.role != expected:
            raise RecordError(
                f"{message.where}: roles out of order: {syntax.name(message.role)!r} where {syntax.name(expected)!r} "
                f"belongs ({syntax.name(Role.USER)} and {syntax.name(Role.ASSISTANT)} messages alternate, an optional "
                f"{syntax.name(Role.SYSTEM)} message first)"
            )
    if messages[-1].role != Role.ASSISTANT:
        raise RecordError(f"{messages[-1].where}: the last {syntax.name(Role.USER)} message has no answer")
    for message in messages[: first] + messages[first + 1 :: 2]:
        _plain_text(message, syntax)


def _answer(message: Message, syntax: Syntax) -> str:
    answer = message.pieces[0]
    if not answer.strip():
        raise RecordError(f"{message.where}: empty answer (an empty {syntax.name(Role.ASSISTANT)} message)")
    return answer


def _plain_text(message: Message, syntax: Syntax) -> str:
    if message.placeholders:
        raise RecordError(
            f"{message.where}: an image placeholder {syntax.placeholder} in a "
            f"{syntax.name(message.role)} message; images belong to {syntax.name(Role.USER)} messages"
        )
    return message.pieces[0]


def _images_by_placeholder(messages: list[Message], images: list[Any], syntax: Syntax) -> list[Message]:
    placeholders = sum(message.placeholders for message in messages)
    if placeholders != len(images):
        raise RecordError(
            f"{placeholders} image placeholder(s) {syntax.placeholder} in the {syntax.name(Role.USER)} messages but "
            f"{len(images)} image(s); every image needs its placeholder, in order"
        )
    placed, first = [], 0
    for message in messages:
        placed.append(Message(message.role, message.pieces, message.where, images[first : first + message.placeholders]))
        first += message.placeholders
    return placed


def _turn(user: Message, answer: str, syntax: Syntax) -> Turn:
    """The placement rules (module docstring) for one user message."""
    if any(IMAGE_TAG.search(piece) for piece in user.pieces):
        raise RecordError(
            f"{user.where}: an <|image_N|> tag written in the text; mark each image with "
            f"{syntax.placeholder}"
        )
    images = list(user.images or [])
    if not user.placeholders:  # images listed apart from the text (the generic format) lead the turn
        return Turn(user.pieces[0], answer, images)
    if user.placeholders != len(images):
        raise RecordError(
            f"{user.where}: {user.placeholders} image tag(s) in the text but {len(images)} "
            "image(s) listed with the turn"
        )
    if not "".join(user.pieces[:-1]).strip():
        return Turn(user.pieces[-1].lstrip(), answer, images)
    text = user.pieces[0] + "".join(f"<|image_{number}|>{piece}" for number, piece in enumerate(user.pieces[1:], 1))
    return Turn(text, answer, images, tags_in_text=True)
