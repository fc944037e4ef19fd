"""common/formats: reading conversation files — records with their lines, the format detected per file, the
placement of images, and one error naming the file and line for each kind of bad record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import UserError
from common.formats import read_conversation_file
from tests.common.formats.same_conversations import write_images, write_json_list, write_jsonl

QUESTION = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


@pytest.fixture
def folder(tmp_path) -> Path:
    write_images(tmp_path)
    return tmp_path


def llava(record_id, conversations, image="red.png") -> dict:
    record = {"id": record_id, "conversations": list(conversations)}
    if image is not None:
        record["image"] = image
    return record


def error_of(path: Path) -> str:
    with pytest.raises(UserError) as info:
        read_conversation_file(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- what is read --------------------------------------------------------------------------------------


def test_a_json_list_over_many_lines_keeps_each_records_line(folder):
    records = [llava("a", QUESTION), llava("b", QUESTION), llava("c", QUESTION[:1] + [{"from": "gpt", "value": ""}])]
    path = write_json_list(folder / "data.json", records)
    first_line_of_c = path.read_text().splitlines().index("  {", 2 + path.read_text().splitlines()[2:].index("  {") + 1) + 1
    assert error_of(path).startswith(f"{path}:{first_line_of_c}: conversations[1]: empty answer")


def test_a_compact_json_list_and_json_lines_read_alike(folder):
    records = [llava("a", QUESTION), llava(7, QUESTION, image=None)]
    records[1]["conversations"][0] = {"from": "human", "value": "What colour?"}
    compact = folder / "compact.json"
    compact.write_text(json.dumps(records))
    lines = write_jsonl(folder / "lines.jsonl", records)
    for path in (compact, lines):
        samples = read_conversation_file(path)
        assert [s.id for s in samples] == ["a", "7"]
        assert samples[0].turns[0].images == [str(folder / "red.png")] and samples[1].images == []


def test_records_without_an_id_are_named_by_file_and_line(folder):
    path = write_jsonl(folder / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                             {"role": "assistant", "content": "Hello"}]}] * 2)
    assert [s.id for s in read_conversation_file(path)] == ["chat-1", "chat-2"]


@pytest.mark.parametrize("value, text, inline", [
    ("<image>\nWhat colour?", "What colour?", False),
    ("  <image> \n\n What colour?", "What colour?", False),  # only whitespace around leading placeholders
    ("<image>", "", False),
    ("What colour?\n<image>", "What colour?\n<|image_1|>", True),
    ("<image> or <image>?", "<|image_1|> or <|image_2|>?", True),  # one not leading: all in place
])
def test_placement(folder, value, text, inline):
    images = ["red.png"] * value.count("<image>")
    record = llava("p", [{"from": "human", "value": value}, {"from": "gpt", "value": "x"}], image=images)
    (sample,) = read_conversation_file(write_jsonl(folder / "p.jsonl", [record]))
    turn = sample.turns[0]
    assert (turn.user, turn.tags_in_text, len(turn.images)) == (text, inline, len(images))
    prefix = "" if inline else "<|image_1|><|image_2|>"[: 11 * len(images)] + "\n"
    assert sample.user_message(turn) == prefix + text


def test_images_are_numbered_from_1_in_every_turn(folder):
    record = llava("n", [{"from": "human", "value": "<image><image> Compare."}, {"from": "gpt", "value": "x"},
                         {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "y"}],
                   image=["red.png", "green.png", "blue.png"])
    (sample,) = read_conversation_file(write_jsonl(folder / "n.jsonl", [record]))
    assert [sample.user_message(turn) for turn in sample.turns] == ["<|image_1|><|image_2|>\nCompare.",
                                                                     "And <|image_1|>?"]
    assert [[Path(image).name for image in turn.images] for turn in sample.turns] == [["red.png", "green.png"],
                                                                                       ["blue.png"]]


def test_image_paths_next_to_the_file_then_under_images_then_image_folder(tmp_path):
    write_images(tmp_path / "data" / "images" / "sub")
    write_images(tmp_path / "elsewhere" / "sub")
    record = llava("i", QUESTION, image="sub/red.png")
    path = write_jsonl(tmp_path / "data" / "d.jsonl", [record])
    assert read_conversation_file(path)[0].images == [str(tmp_path / "data" / "images" / "sub" / "red.png")]
    write_images(tmp_path / "data" / "sub")
    assert read_conversation_file(path)[0].images == [str(tmp_path / "data" / "sub" / "red.png")]
    elsewhere = read_conversation_file(path, tmp_path / "elsewhere")[0].images
    assert elsewhere == [str(tmp_path / "elsewhere" / "sub" / "red.png")]


# ---- one error per bad record: file, line, what, and the fix -------------------------------------------


GOOD = {  # a good first record in each format (the file's format is its first record's)
    "llava": llava("ok", QUESTION),
    "chat": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "generic": {"conversations": [{"user": "q", "assistant": "a"}]},
}


def bad(folder: Path, record: dict, *, name: str = "bad.jsonl", first: str | None = None) -> str:
    """The error of a file whose second line is `record`, after a good record of the same format."""
    if first is None:
        first = "chat" if "messages" in record else "generic" if "user" in record["conversations"][0] else "llava"
    path = write_jsonl(folder / name, [GOOD[first], record])
    message = error_of(path)
    assert message.startswith(f"{path}:2: "), message
    return message


def test_unknown_format_lists_what_was_expected(folder):
    path = folder / "unknown.jsonl"
    write_jsonl(path, [{"question": "q", "answer": "a"}])
    message = error_of(path)
    assert message.startswith(f"{path}:1: unknown format, a record with keys ['answer', 'question']")
    for expected in ("generic", "LLaVA/ShareGPT", "chat messages", '"from"', '"role"', '"user"'):
        assert expected in message


@pytest.mark.parametrize("record, fragment", [
    (llava("m", QUESTION, image=["red.png", "green.png"]), "1 image placeholder(s) <image> in the human messages but 2 image(s)"),
    (llava("m", QUESTION, image=None), "1 image placeholder(s) <image> in the human messages but 0 image(s)"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                   {"role": "assistant", "content": "x"}], "images": ["red.png"]},
     '2 image placeholder(s) {"type": "image"} in the user messages but 1 image(s)'),
    ({"conversations": [{"images": ["red.png"], "user": "<|image_1|> vs <|image_2|>", "assistant": "x"}]},
     "conversations[0].user: 2 image tag(s) in the text but 1 image(s) listed with the turn"),
    ({"conversations": [{"images": ["red.png", "blue.png"], "user": "<|image_2|> vs <|image_1|>", "assistant": "x"}]},
     "conversations[0].user: image tags <|image_2|>, <|image_1|>; they must be <|image_1|>, <|image_2|>, ... in order"),
    (llava("m", [{"from": "human", "value": "<|image_1|> What?"}, {"from": "gpt", "value": "x"}], image=None),
     "conversations[0]: an <|image_N|> tag written in the text; mark each image with <image>"),
])
def test_placeholders_must_match_the_images(folder, record, fragment):
    assert fragment in bad(folder, record)


def test_a_missing_image_names_where_it_was_looked_for(folder):
    message = bad(folder, llava("m", QUESTION, image="gone/red.png"))
    assert f"image gone/red.png does not exist (looked for {folder / 'gone' / 'red.png'} and " \
           f"{folder / 'images' / 'gone' / 'red.png'})" in message


@pytest.mark.parametrize("conversation, fragment", [
    ([{"from": "gpt", "value": "x"}, QUESTION[0]], "conversations[0]: the conversation starts with an answer (gpt); it must start with a human message"),
    ([{"from": "system", "value": "s"}, {"from": "gpt", "value": "x"}],
     "conversations[1]: the conversation starts with an answer (gpt)"),
    ([QUESTION[0], {"from": "human", "value": "again"}, QUESTION[1]],
     "conversations[1]: roles out of order: 'human' where 'gpt' belongs"),
    ([*QUESTION, {"from": "system", "value": "late"}, {"from": "gpt", "value": "x"}],
     "conversations[2]: roles out of order: 'system' where 'human' belongs"),
    ([*QUESTION, {"from": "human", "value": "More?"}], "conversations[2]: the last human message has no answer"),
    ([QUESTION[0], {"from": "gpt", "value": "  "}], "conversations[1]: empty answer"),
    ([QUESTION[0], {"from": "gpt", "value": "<image> here"}], "conversations[1]: an image placeholder <image> in a gpt message"),
    ([QUESTION[0], {"from": "robot", "value": "x"}], 'conversations[1] must be {"from": "human" | "gpt" | "system"'),
])
def test_roles_and_answers(folder, conversation, fragment):
    assert fragment in bad(folder, llava("r", conversation))


@pytest.mark.parametrize("record, fragment", [
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "q"}]},
     "messages[0]: the conversation starts with an answer (assistant); it must start with a user message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": ""}]}]},
     "messages[1]: empty answer"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]},
     "messages[1]: roles out of order: 'user' where 'assistant' belongs"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}]},
     'messages[0]: content items must be {"type": "text", "text": ...} or {"type": "image"}'),
    ({"conversations": [{"user": "q", "assistant": ""}]}, "conversations[0].assistant: empty answer"),
    ({"conversations": [{"user": "q"}]}, "conversations[0] must be an object with 'user' and 'assistant'"),
    ({"conversations": [{"images": "red.png", "user": "q", "assistant": "a"}]}, "'images' must be a list of paths"),
])
def test_chat_and_generic_records(folder, record, fragment):
    assert fragment in bad(folder, record)


def test_a_record_of_another_format_than_the_first(folder):
    message = bad(folder, {"conversations": [{"user": "q", "assistant": "a"}]}, first="llava")
    assert "(read as LLaVA/ShareGPT, the format of the file's first record)" in message


@pytest.mark.parametrize("text, line", [
    ('[{"conversations": [{"user": "q",\n "assistant": "a"}]},\n{oops}]', 3),
    ('[{"conversations": [{"user": "q", "assistant": "a"}]}\n\n{"x": 1}]', 3),
    ('{"conversations": [{"user": "q", "assistant": "a"}]}\n{not json\n', 2),
    ('{"conversations": [{"user": "q", "assistant": "a"}]}\n["a", "list"]\n', 2),
])
def test_invalid_json_names_the_line(folder, text, line):
    path = folder / "broken.json"
    path.write_text(text)
    assert error_of(path).startswith(f"{path}:{line}: ")


def test_an_empty_file(folder):
    for text in ("", "[]", "\n\n"):
        path = folder / "empty.json"
        path.write_text(text)
        assert error_of(path) == f"{path}: no samples"
