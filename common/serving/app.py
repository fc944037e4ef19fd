"""The web layer of `predict.py --serve`: FastAPI routes, served by uvicorn.

    GET  /                     the chat page (chat.html)
    GET  /health               200 while the server runs (no key needed, for load balancers and scripts)
    GET  /v1/models            the models served: --model, then --compare
    POST /v1/chat/completions  an answer, whole or streamed as server-sent events (OpenAI's chunks, then [DONE])

Every refusal is a 4xx with OpenAI's error body (`requests.ApiError`); a failure of the server itself is a 500 of
the same shape, logged with its traceback; either way the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..distributed import Distributed
from ..errors import UsageError
from ..inference import ModelSource, load_for_inference
from ..precision import Precision
from .engine import Completion, Engine, Prompt, Sampling, ServedModel
from .options import API_KEY_VARIABLE, ServingConfig
from .requests import ApiError, ChatRequest, ImageSource, conversation_sample, parse_request

logger = logging.getLogger(__name__)

CHAT_PAGE = Path(__file__).with_name("chat.html")
OWNER = "phi3v-finetune"


def serve(config: ServingConfig, source: ModelSource, precision: Precision, distributed: Distributed) -> None:
    """Load the model(s) once and answer until stopped (Ctrl-C or SIGTERM)."""
    import uvicorn

    if distributed.world_size > 1:
        raise UsageError("--serve runs in one process: start it with python, not torchrun")
    sources = [(config.model_name, source)] + ([(config.compare_name, config.compare)] if config.compare else [])
    models = []
    for name, where in sources:
        logger.info("loading %s: %s, %s", name, where.describe(), precision.describe())
        processor, model = load_for_inference(where, precision, distributed.device, config.num_crops)
        models.append(ServedModel(name, processor, model, precision, config.max_model_len))
    engine = Engine(models)
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        logger.warning("listening on %s without an API key: anyone who reaches this machine can use the model; "
                       "set %s or --api_key", config.host, API_KEY_VARIABLE)
    logger.info("chat page: http://%s:%d/  API: http://%s:%d/v1  (requests queued, answered one at a time)",
                config.host, config.port, config.host, config.port)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host=config.host, port=config.port,
                                           log_config=None, timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        engine.close()


def create_app(engine: Engine, config: ServingConfig) -> FastAPI:
    app = FastAPI(title="Phi-3.5-vision", docs_url=None, redoc_url=None, openapi_url=None)
    images = ImageSource(config.allowed_local_media_path, config.max_images)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def refused(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def not_found(request: Request, error: HTTPException) -> JSONResponse:  # unknown paths, wrong methods
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(_server_error(error).body(), status_code=500)

    def require_key(request: Request) -> None:
        """With a key set, /v1 answers only requests that carry it, as the OpenAI API does."""
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise ApiError(401, "no API key given: send the header 'Authorization: Bearer YOUR_KEY'", None,
                           "invalid_api_key")
        if not hmac.compare_digest(given.removeprefix("Bearer ").encode(), config.api_key.encode()):
            raise ApiError(401, "incorrect API key", None, "invalid_api_key")

    with_key = [Depends(require_key)]

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=with_key)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": OWNER}
                                           for name in engine.models]}

    @app.post("/v1/chat/completions", dependencies=with_key)
    async def chat_completions(request: Request):
        chat = parse_request(await _body(request, config.max_request_bytes))
        served = engine.model(chat.model)
        loop = asyncio.get_running_loop()
        sample = await loop.run_in_executor(None, conversation_sample, chat, images)
        prompt, max_tokens = await loop.run_in_executor(
            engine.preparation, served.prepare, sample, chat.answer_limit, config.default_max_tokens)
        sampling = Sampling(max_tokens, chat.temperature, chat.top_p, chat.stop_strings, chat.seed)
        job = Job(engine, served, prompt, sampling, loop)
        if chat.stream:
            return StreamingResponse(_chunks(job, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            completion = await job.completion()
        finally:
            job.cancel()  # this wait was cancelled (the server stopping): nothing more to generate
        return _response(job, completion)

    return app


async def _body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is longer than `limit`, announced or not."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over {limit / 2**20:g} MiB (--max_request_mb); send smaller images",
                    None, "request_too_large")


def _server_error(error: Exception) -> ApiError:
    return ApiError(500, f"the server failed to answer ({type(error).__name__}); its log has the details",
                    kind="server_error")


class Job:
    """One request's generation on the generation thread; its text and end come back to the event loop in order."""

    def __init__(self, engine: Engine, served: ServedModel, prompt: Prompt, sampling: Sampling,
                 loop: asyncio.AbstractEventLoop):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = served.name
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._loop = loop
        self._future = engine.generation.submit(self._run, served, prompt, sampling)

    def _run(self, served: ServedModel, prompt: Prompt, sampling: Sampling) -> None:
        if self._cancelled.is_set():
            return
        try:
            completion = served.generate(prompt, sampling, self._post_text, self._cancelled.is_set)
        except Exception as error:  # noqa: BLE001 (reported to the request, logged with its traceback)
            logger.exception("generation failed")
            self._post(("error", error))
        else:
            self._post(("done", completion))

    def _post_text(self, text: str) -> None:
        self._post(("text", text))

    def _post(self, event: tuple) -> None:
        self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self._cancelled.set()
        self._future.cancel()

    async def completion(self) -> Completion:
        async for kind, value in self.stream():
            if kind == "done":
                return value
        raise RuntimeError("generation ended without an answer")

    async def stream(self) -> AsyncIterator[tuple[str, object]]:
        """("text", piece)... then ("done", Completion); a failure is raised here."""
        while True:
            kind, value = await self.events.get()
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return


def _response(job: Job, completion: Completion) -> dict:
    return {
        "id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": completion.finish_reason, "logprobs": None}],
        "usage": _usage(completion),
    }


def _usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


async def _chunks(job: Job, chat: ChatRequest) -> AsyncIterator[str]:
    """Server-sent events as the OpenAI API streams: the role, the text piece by piece, the finish reason, the
    usage if asked for, then [DONE]. A failure after the first event can only be reported in the stream."""

    def event(delta: dict, finish_reason: str | None = None, **extra) -> str:
        chunk = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    try:
        yield event({"role": "assistant", "content": ""})
        async for kind, value in job.stream():
            if kind == "text":
                yield event({"content": value})
            else:
                yield event({}, value.finish_reason)
                if chat.stream_options is not None and chat.stream_options.include_usage:
                    usage = {"id": job.id, "object": "chat.completion.chunk", "created": job.created,
                             "model": job.model, "choices": [], "usage": _usage(value)}
                    yield f"data: {json.dumps(usage)}\n\n"
    except Exception as error:  # noqa: BLE001 (the status line is sent: the error goes in the stream)
        yield f"data: {json.dumps(_server_error(error).body())}\n\n"
    finally:
        job.cancel()  # the client went away mid-answer, or the answer is complete: nothing more to generate
    yield "data: [DONE]\n\n"
