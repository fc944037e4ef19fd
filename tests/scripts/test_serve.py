"""predict.py --serve answers as predict.py does: one server (a LoRA adapter served unmerged on the tiny model,
with the tiny model itself as --compare) answers one-image, two-image and multi-turn questions with
predict.py's answers for both models, streamed or not, also 8 at once; bad requests get their 4xx in the OpenAI
error shape and the server goes on; /v1 needs the API key; the chat page answers an uploaded image."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.scripts.e2e import COLOUR_QUESTION, REPO_ROOT, colour_image, free_port

PREDICT = REPO_ROOT / "predict.py"
KEY = "test-key-123"
MAX_TOKENS = 6
START_TIMEOUT = 120  # seconds for the server to load its models and listen
REQUEST_TIMEOUT = 60


def write_adapter(base: Path, folder: Path) -> Path:
    """A LoRA adapter on `base` with random (not zero) weights, so that it changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from common.model_loading import LANGUAGE_LORA_TARGETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_LORA_TARGETS, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder, save_embedding_layers=False)
    return folder


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()}}


def conversations(images: Path) -> dict[str, tuple[list[dict], list[Path]]]:
    """{id: (API messages, their images in order)}: one image, two images, and a multi-turn conversation."""
    red, blue, green = (images / f"{name}.png" for name in ("red", "blue", "green"))
    return {
        "one image": ([{"role": "user", "content": [image_part(red), {"type": "text", "text": COLOUR_QUESTION}]}],
                      [red]),
        "two images": ([{"role": "user", "content": [
            image_part(blue), image_part(green), {"type": "text", "text": "Which colour is each image?"}]}],
            [blue, green]),
        "multi-turn": ([
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": [image_part(green), {"type": "text", "text": COLOUR_QUESTION}]},
            {"role": "assistant", "content": "green"},
            {"role": "user", "content": [{"type": "text", "text": "And this one? "}, image_part(red)]},
        ], [green, red]),
    }


def chat_messages_record(question_id: str, messages: list[dict], images: list[Path]) -> dict:
    """The same conversation in the chat-messages format of predict.py --data_file."""
    def content(value):
        if isinstance(value, str):
            return value
        return [{"type": "image"} if part["type"] == "image_url" else part for part in value]

    return {"id": question_id, "images": [str(path) for path in images],
            "messages": [{"role": m["role"], "content": content(m["content"])} for m in messages]}


class Client:
    def __init__(self, port: int, key: str | None = KEY):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.key = key

    def request(self, method: str, path: str, body: bytes | None = None, key: str | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key or self.key:
            sent["Authorization"] = f"Bearer {key or self.key}"
        request = urllib.request.Request(self.base + path, data=body, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def chat(self, model: str, messages: list[dict], **options) -> tuple[int, dict | str]:
        body = json.dumps({"model": model, "messages": messages, **options}).encode()
        status, data = self.request("POST", "/v1/chat/completions", body)
        return status, data.decode() if options.get("stream") and status == 200 else json.loads(data)

    def answer(self, model: str, messages: list[dict], **options) -> str:
        status, body = self.chat(model, messages, **options)
        assert status == 200, body
        return body["choices"][0]["message"]["content"]

    def streamed(self, model: str, messages: list[dict]) -> tuple[str, list[dict]]:
        """The streamed answer's text and its chunks; the stream ends with [DONE]."""
        status, text = self.chat(model, messages, stream=True, stream_options={"include_usage": True})
        assert status == 200, text
        events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(event) for event in events[:-1]]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]), chunks


@pytest.fixture(scope="module")
def served(launcher, tiny_model_dir, tmp_path_factory):
    """(client, {model id: {question id: predict.py's answer}}, conversations, image folder) of one server."""
    root = tmp_path_factory.mktemp("serve")
    images = root / "images"
    images.mkdir()
    for name in ("red", "blue", "green"):
        colour_image(name, (32 + len(name), 24)).save(images / f"{name}.png")
    adapter = write_adapter(tiny_model_dir, root / "adapter")
    questions = conversations(images)
    data_file = root / "questions.jsonl"
    data_file.write_text("".join(json.dumps(chat_messages_record(name, *conversation)) + "\n"
                                 for name, conversation in questions.items()))
    port = free_port()
    server = launcher.start(PREDICT, [
        "--model", adapter, "--compare", tiny_model_dir, "--serve", "--port", port, "--api_key", KEY,
        "--max_new_tokens", MAX_TOKENS, "--allowed_local_media_path", images, "--max_images", 3, "--max_model_len", 2000,
        "--max_request_mb", 1])
    try:
        outputs = {str(model): root / f"answers-{index}.jsonl" for index, model in enumerate((adapter, tiny_model_dir))}
        jobs = {model: (PREDICT, ["--model", model, "--data_file", data_file, "--output", output,
                                  "--max_new_tokens", MAX_TOKENS, "--batch_size", 1, "--no-tqdm"])
                for model, output in outputs.items()}
        for result in launcher.run_many(jobs).values():
            result.check()
        answers = {model: {record["id"]: record["prediction"] for record in map(json.loads, output.read_text().splitlines())}
                   for model, output in outputs.items()}
        client = Client(port)
        wait_until_serving(client, server)
        yield client, answers, questions, images
    finally:
        os.kill(server.pid, signal.SIGTERM)  # uvicorn finishes the open requests, then ends by the signal
        result = launcher.wait(server, timeout=30)
        assert "Finished server process" in result.stdout, result.tail()


def wait_until_serving(client: Client, server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.status.exists():
            pytest.fail(f"the server exited:\n{server.stderr.read_text()[-3000:]}{server.stdout.read_text()[-3000:]}")
        try:
            if client.request("GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail("the server did not answer /health in time")


def test_answers_equal_predict_for_the_adapter_and_the_full_model(served):
    client, answers, questions, _ = served
    assert len(set(answers)) == 2 and any(
        answers[model] != other for model in answers for other in answers.values())  # the adapter changes answers
    for model, expected in answers.items():
        for name, (messages, _images) in questions.items():
            assert client.answer(model, messages) == expected[name], (model, name)
            text, chunks = client.streamed(model, messages)
            assert text == expected[name], (model, name)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
            assert chunks[-1]["usage"]["completion_tokens"] <= MAX_TOKENS


def test_models_health_and_local_files(served):
    client, answers, questions, images = served
    status, body = client.request("GET", "/v1/models")
    assert status == 200 and [model["id"] for model in json.loads(body)["data"]] == list(answers)
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": (images / "red.png").as_uri()}},
                                          {"type": "text", "text": COLOUR_QUESTION}]}]
    model = next(iter(answers))
    assert client.answer(model, local) == answers[model]["one image"]  # a file:// URL inside the allowed folder
    assert client.request("GET", "/health", key="wrong")[0] == 200


def test_eight_concurrent_requests_are_each_answered_as_if_alone(served):
    client, answers, questions, _ = served
    jobs = [(model, name, index % 2 == 0) for index, (model, name) in
            enumerate((model, name) for model in answers for name in questions)]
    jobs = (jobs * 2)[:8]

    def ask(job):
        model, name, stream = job
        messages = questions[name][0]
        return client.streamed(model, messages)[0] if stream else client.answer(model, messages)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, jobs))
    assert results == [answers[model][name] for model, name, _ in jobs]


def bad_requests(images: Path, model: str) -> dict[str, tuple[dict | bytes, int, str, str | None]]:
    """{what: (body, status, error code or message part, param)}."""
    def ask(*parts, **fields):
        return {"model": model, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}],
                **fields}

    red = image_part(images / "red.png")
    outside = images.parent / "outside.png"
    colour_image("red").save(outside)
    return {
        "undecodable image": (ask({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}),
                              400, "invalid_image", "messages[0].content[0].image_url"),
        "too many images": (ask(red, red, red, red), 400, "too_many_images", "messages"),
        "wrong field type": (ask(red, max_tokens="5"), 400, "valid integer", "max_tokens"),
        "content of the wrong type": ({"model": model, "messages": [{"role": "user", "content": 5}]}, 400, "valid",
                                      "messages[0].content"),
        "prompt over the context": (ask(red, red, red), 400, "context_length_exceeded", "messages"),
        "image outside the allowed folder": (ask({"type": "image_url", "image_url": {"url": outside.as_uri()}}),
                                             403, "local_file_refused", "messages[0].content[0].image_url"),
        "remote image": (ask({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}), 400,
                         "remote_url_refused", "messages[0].content[0].image_url"),
        "oversized body": (ask({"type": "text", "text": "x" * (1024 * 1024)}), 413, "request_too_large", None),
        "not JSON": (b"{not json", 400, "not valid JSON", None),
        "unknown model": (ask(red) | {"model": "nope"}, 404, "model_not_found", "model"),
        "last message not a question": ({"model": model, "messages": [{"role": "assistant", "content": "hi"}]}, 400,
                                        "the last message must be the user's question", "messages"),
    }


def test_each_bad_request_gets_its_4xx_and_the_server_goes_on(served):
    client, answers, questions, images = served
    model = next(iter(answers))
    for what, (body, status, expected, param) in bad_requests(images, model).items():
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, response = client.request("POST", "/v1/chat/completions", data)
        error = json.loads(response)["error"]
        assert got == status, (what, error)
        assert set(error) == {"message", "type", "param", "code"}, what
        assert expected in (error["code"] or "") or expected in error["message"], (what, error)
        assert error["param"] == param, (what, error)
        assert client.answer(model, questions["one image"][0]) == answers[model]["one image"], what


def test_the_api_needs_the_key(served):
    client, answers, questions, _ = served
    for key in (None, "wrong"):
        status, body = Client(client.port, key=None).request("GET", "/v1/models", key=key)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", body


def test_the_chat_page_answers_an_uploaded_image(served, browser):
    client, answers, questions, images = served
    page = browser.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(client.base + "/")
        page.fill("#api-key", KEY)  # the page asks for the key after /v1/models said 401
        page.click("#key-form button")
        page.fill("#max-tokens", str(MAX_TOKENS))
        page.set_input_files("#file-input", str(images / "red.png"))
        page.wait_for_selector("#attachments img")
        page.fill("#question", COLOUR_QUESTION)
        page.press("#question", "Enter")
        page.wait_for_function("document.querySelectorAll('.answer.done').length === 2", timeout=30_000)
        shown = {card.get_attribute("data-model"): card.query_selector(".text").text_content()
                 for card in page.query_selector_all(".answer")}
        assert shown == {model: expected["one image"] for model, expected in answers.items()}
        assert page.query_selector(".user img") is not None
    finally:
        page.close()
    assert not [error for error in errors if "401" not in error], errors  # the first /v1/models is refused
