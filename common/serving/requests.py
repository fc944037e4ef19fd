"""A chat completions request, checked: its JSON -> `ChatRequest` (the OpenAI fields this server honours, of the
right types) -> the `Sample` it asks about, built as every conversation format builds its samples
(common/formats/conversation.py: build_sample), so a conversation sent here gives the same prompt as the same
conversation in a --data_file (chat messages: `{"type": "image"}` where this API has an `image_url` part).

Images come as `image_url` content parts: `data:` URLs (base64), or `file://` URLs inside
--allowed_local_media_path (as vLLM's flag of that name). Remote URLs are never fetched. Every problem is an
`ApiError`, answered as the OpenAI API answers errors: `{"error": {"message", "type", "param", "code"}}`.
Fields of the API that this server does not use (`frequency_penalty`, `logprobs`, `user`, ...) are ignored,
as vLLM ignores them.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data import Sample
from ..formats.conversation import Message, RecordError, Syntax, build_sample

MAX_STOP_STRINGS = 4  # as the OpenAI API
API_SYNTAX = Syntax("messages", '{"type": "image_url"} content part')  # how error messages name things
UNION_BRANCHES = ("str", "int", "float", "bool", "none")  # how pydantic names the branches of a union in errors


class ApiError(Exception):
    """A request the server does not answer, as the OpenAI API reports it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "5" is not a number, 1 is not a bool; unknown fields are ignored (module docstring)
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the image processor decides the crops


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None  # None: the first model served
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the API's newer name of max_tokens
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0: greedy, as the evaluation and predict.py
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        strings = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(string for string in strings if string)


def parse_request(body: bytes) -> ChatRequest:
    """The request of a JSON body; an ApiError names the wrong field as the API names it ("messages[0].content")."""
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as error:
        raise _invalid(error.errors()) from error
    if isinstance(request.stop, list) and len(request.stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings, got {len(request.stop)}", "stop")
    if request.messages[-1].role != "user":
        raise ApiError(400, "messages: the last message must be the user's question (role 'user')", "messages")
    return request


def _invalid(errors: list[dict]) -> ApiError:
    """The deepest problem (for a field of several allowed types, the type it came closest to), every allowed
    type's message when none came closer."""
    if errors[0]["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({errors[0]['msg']})")
    depth = max(len(error["loc"]) for error in errors)
    deepest = [error for error in errors if len(error["loc"]) == depth]
    param = _param(deepest[0]["loc"])
    messages = ", or ".join(dict.fromkeys(error["msg"] for error in deepest if _param(error["loc"]) == param))
    return ApiError(400, f"{param or 'the body'}: {messages}", param or None)


def _param(location: tuple) -> str:
    """pydantic's error location -> the field as the API writes it, without the names pydantic gives the branches
    of a union ('str', 'list[str]') or the tag of a content part ('image_url' in content[0].image_url.url)."""
    param, tag_follows = "", False
    for part in location:
        if isinstance(part, int):
            param += f"[{part}]"
        elif tag_follows:
            tag_follows = False
        elif "[" in part or part in UNION_BRANCHES:
            tag_follows = part.startswith("list[tagged-union")
        else:
            param += f".{part}" if param else part
    return param


class ImageSource:
    """Where a request's images may come from: data: URLs always, file:// URLs inside `local_folder` only."""

    def __init__(self, local_folder: Path | None, max_images: int):
        self.local_folder = local_folder
        self.max_images = max_images

    def open(self, url: str, param: str) -> Image.Image:
        if url.startswith("data:"):
            return _decoded(_data_url_bytes(url, param), param)
        scheme = urlparse(url).scheme
        if scheme == "file":
            return _decoded(self._local_bytes(url, param), param)
        if scheme in ("http", "https"):
            raise ApiError(400, f"{param}: remote image URLs are not fetched; send the image as a data: URL "
                           "(data:image/png;base64,...)", param, "remote_url_refused")
        raise ApiError(400, f"{param}: an image URL must be a data: URL (or a file:// URL inside the server's "
                       f"--allowed_local_media_path), got {url[:40]!r}", param)

    def _local_bytes(self, url: str, param: str) -> bytes:
        if self.local_folder is None:
            raise ApiError(400, f"{param}: local files are not served; start the server with "
                           "--allowed_local_media_path FOLDER, or send the image as a data: URL", param,
                           "local_file_refused")
        path = Path(unquote(urlparse(url).path)).resolve()
        if not path.is_relative_to(self.local_folder):
            raise ApiError(403, f"{param}: {path} is outside the allowed folder {self.local_folder}", param,
                           "local_file_refused")
        try:
            return path.read_bytes()
        except OSError as error:
            raise ApiError(400, f"{param}: cannot read {path} ({error.strerror or error})", param) from error


def _data_url_bytes(url: str, param: str) -> bytes:
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(400, f"{param}: a data: URL must be base64, data:image/...;base64,...", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ApiError(400, f"{param}: the data: URL is not valid base64 ({error})", param) from error


def _decoded(data: bytes, param: str) -> Image.Image:
    """The image, fully decoded now, so that a broken one is this request's 400 and never the generation's failure."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError as error:
        raise ApiError(400, f"{param}: not an image in a format Pillow reads (PNG, JPEG, WebP, GIF, ...)", param,
                       "invalid_image") from error
    except (OSError, Image.DecompressionBombError, ValueError) as error:
        raise ApiError(400, f"{param}: cannot decode the image ({error})", param, "invalid_image") from error
    return image


def conversation_sample(request: ChatRequest, images: ImageSource) -> Sample:
    """The sample the request asks about, built by the rules every conversation format shares (images in order,
    the last question unanswered). Decodes every image (CPU work: call it off the event loop)."""
    image_parts = [(f"messages[{m}].content[{p}].image_url", part.image_url.url)
                   for m, message in enumerate(request.messages) if isinstance(message.content, list)
                   for p, part in enumerate(message.content) if isinstance(part, ImagePart)]
    if len(image_parts) > images.max_images:
        raise ApiError(400, f"{len(image_parts)} images in the messages; this server takes at most "
                       f"{images.max_images} per request (--max_images)", "messages", "too_many_images")
    messages = [Message(message.role, _pieces(message.content), f"messages[{number}]")
                for number, message in enumerate(request.messages)]
    decoded = [images.open(url, param) for param, url in image_parts]
    try:
        return build_sample("request", messages, API_SYNTAX, decoded, answered=False)
    except RecordError as error:
        raise ApiError(400, str(error), "messages") from error


def _pieces(content: str | list) -> tuple[str, ...]:
    """The message's text split at its images, as `Message.pieces`."""
    if isinstance(content, str):
        return (content,)
    pieces = [""]
    for part in content:
        if isinstance(part, TextPart):
            pieces[-1] += part.text
        else:
            pieces.append("")
    return tuple(pieces)
