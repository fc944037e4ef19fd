"""A request's JSON -> its checked fields and the Sample it asks about: the same Sample as the conversation in a
chat-messages file; images from data: URLs or the allowed folder only; each problem an ApiError naming the field."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from common.formats import chat
from common.serving.requests import ApiError, ImageSource, conversation_sample, parse_request
from tests.common.formats.same_conversations import CHAT, image


def data_url(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def as_request(record: dict) -> dict:
    """A chat-messages record, its last answer left out, as an API request: each image item an image_url part."""
    images = iter(record.get("images", []))

    def part(item: dict) -> dict:
        return {"type": "image_url", "image_url": {"url": data_url(image(next(images)))}} if item["type"] == "image" else item

    return {"messages": [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                          else [part(item) for item in m["content"]]} for m in record["messages"][:-1]]}


def sample_of(body: dict, source: ImageSource | None = None):
    return conversation_sample(parse_request(json.dumps(body).encode()), source or ImageSource(None, 8))


def refusal(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("record", CHAT, ids=[record["id"] for record in CHAT])
def test_a_request_asks_what_the_same_chat_messages_record_asks(record):
    question = {**record, "messages": record["messages"][:-1]}
    expected = chat.read(question, "request", image, answered=False)
    sample = sample_of(as_request(record))
    assert [(turn.user, turn.assistant, turn.tags_in_text) for turn in sample.turns] == \
           [(turn.user, turn.assistant, turn.tags_in_text) for turn in expected.turns]
    assert sample.system == expected.system
    assert [picture.tobytes() for picture in sample.images] == [picture.tobytes() for picture in expected.images]


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": 1}, "stream", "valid boolean"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid string, or Input should be a valid array"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]},
     "messages[0].content[0].image_url.url", "valid string"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]", "'text', 'image_url'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "'system', 'user' or 'assistant'"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "less than or equal to 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, "stop", "at most 4 strings"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]}, "messages",
     "the last message must be the user's question"),
])
def test_a_field_of_the_wrong_type_or_value_is_named(body, param, message):
    error = refusal(lambda: parse_request(json.dumps(body).encode()))
    assert (error.status, error.param) == (400, param)
    assert message in error.message and error.message.startswith(param)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_what_is_not_json_or_not_an_object_is_refused():
    assert "not valid JSON" in refusal(lambda: parse_request(b"{messages")).message
    assert refusal(lambda: parse_request(b"[1, 2]")).message.startswith("the body: ")


def test_the_options_a_request_may_leave_out():
    request = parse_request(b'{"messages": [{"role": "user", "content": "hi"}], "stop": "##", "user": "ignored"}')
    assert (request.model, request.answer_limit, request.temperature, request.top_p, request.stream) == \
           (None, None, 0.0, 1.0, False)
    assert request.stop_strings == ("##",)
    assert parse_request(b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7, '
                         b'"max_tokens": 3}').answer_limit == 7


def ask(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What colour?"}]}]}


def test_images_come_from_data_urls_and_the_allowed_folder_only(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    image("red.png").save(allowed / "red.png")
    image("blue.png").save(tmp_path / "secret.png")
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    source = ImageSource(allowed.resolve(), max_images=2)
    assert sample_of(ask(data_url(image("green.png"))), source).images[0].size == image("green.png").size
    assert sample_of(ask((allowed / "red.png").as_uri()), source).images[0].size == image("red.png").size
    for url, status, code in [
        ((tmp_path / "secret.png").as_uri(), 403, "local_file_refused"),
        ((allowed / "link.png").as_uri(), 403, "local_file_refused"),  # a link out of the folder
        ((allowed / ".." / "secret.png").as_uri(), 403, "local_file_refused"),
        ("https://example.com/cat.png", 400, "remote_url_refused"),
        ("data:image/png;base64,aGVsbG8=", 400, "invalid_image"),
        ("data:image/png;base64,***", 400, None),
        ("cat.png", 400, None),
    ]:
        error = refusal(lambda url=url: sample_of(ask(url), source))
        assert (error.status, error.code, error.param) == (status, code, "messages[0].content[0].image_url"), url
    no_files = refusal(lambda: sample_of(ask((allowed / "red.png").as_uri()), ImageSource(None, 2)))
    assert "--allowed_local_media_path" in no_files.message


def test_too_many_images_and_misplaced_tags_are_refused():
    red = {"type": "image_url", "image_url": {"url": data_url(image("red.png"))}}
    error = refusal(lambda: sample_of({"messages": [{"role": "user", "content": [red, red, red]}]}, ImageSource(None, 2)))
    assert (error.status, error.code) == (400, "too_many_images")
    error = refusal(lambda: sample_of({"messages": [{"role": "user", "content": "<|image_1|> What colour?"}]}))
    assert error.message.startswith("messages[0]: an <|image_N|> tag written in the text; mark each image with "
                                    '{"type": "image_url"} content part')
    error = refusal(lambda: sample_of({"messages": [{"role": "assistant", "content": "Hi"},
                                                    {"role": "user", "content": "What colour?"}]}))
    assert "starts with an answer" in error.message
