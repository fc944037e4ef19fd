"""The models a server answers with, and how an answer is made: the same prompt and generation as predict.py.

A request's prompt is built by the evaluation's collator (`Phi3VEvalCollator`) from its `Sample`, and its
answer generated with the evaluation's options (`answer_generation_options`: greedy unless the request sets a
temperature, the same end tokens) and decoded as the evaluation decodes (`decode_answers`), under the
precision's autocast: the answer to a question is predict.py's.

Requests are queued, not batched: one thread prepares prompts (the tokenizer is used from one thread) and
one thread generates, one request at a time in arrival order. A request is answered exactly as if alone (a
batch of one, as predict.py answers --prompt), each with its own sampling settings and stop strings; the
price is throughput, which vLLM's continuous batching gives to merged models (docs/serving.md).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..collators import Phi3VEvalCollator
from ..data import Sample
from ..errors import UserError
from ..evaluation import answer_generation_options, decode_answers
from ..precision import Precision
from .requests import ApiError

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what decoding gives for a character whose bytes are not all generated yet


@dataclass(frozen=True)
class Sampling:
    """How one request's answer is generated."""

    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    stop: tuple[str, ...]  # the answer ends before the first of these (not included)
    seed: int | None

    def generate_options(self) -> dict:
        if self.temperature == 0:
            return {}
        # top_k 0: no top-k cut (the API has none; transformers would otherwise cut at 50)
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


@dataclass(frozen=True)
class Prompt:
    inputs: dict  # the collator's batch of one: input_ids, attention_mask, pixel_values, image_sizes
    tokens: int  # its length, image tokens included


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (an end token or a stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int


class ServedModel:
    """One model behind the API, under the id `name`; `prepare` runs on the preparation thread, `generate` on
    the generation thread (each owns its tokenizer: fast tokenizers are not shared across threads)."""

    def __init__(self, name: str, processor, model, precision: Precision, max_model_len: int | None):
        self.name = name
        self.model = model
        self.precision = precision
        self.collator = Phi3VEvalCollator(processor)
        self.answer_tokenizer = copy.deepcopy(processor.tokenizer)
        self.device = next(model.parameters()).device
        self.context = max_model_len or _context_length(model)

    def prepare(self, sample: Sample, max_tokens: int | None, default_max_tokens: int) -> tuple[Prompt, int]:
        """The prompt and the answer's token limit; an ApiError when they do not fit the context."""
        try:
            batch = self.collator([sample])
        except UserError as error:
            raise ApiError(400, str(error).removeprefix("sample request: "), "messages") from error
        batch.pop("ids"), batch.pop("references")
        tokens = batch["input_ids"].shape[1]
        room = self.context - tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            wanted = f" and {max_tokens} for the answer" if max_tokens is not None else ""
            raise ApiError(400, f"this model's maximum context length is {self.context} tokens; the messages take "
                           f"{tokens} (images included){wanted}; shorten the conversation, send fewer or smaller "
                           "images, or lower max_tokens", "messages", "context_length_exceeded")
        return Prompt(batch, tokens), max_tokens if max_tokens is not None else min(default_max_tokens, room)

    @torch.no_grad()
    def generate(self, prompt: Prompt, sampling: Sampling, on_text: Callable[[str], None],
                 cancelled: Callable[[], bool]) -> Completion:
        """The answer; `on_text` gets it piece by piece as it grows (the pieces add up to the answer's text)."""
        inputs = {key: value.to(self.device) for key, value in prompt.inputs.items()}
        options = {**answer_generation_options(self.answer_tokenizer), **sampling.generate_options()}
        watcher = AnswerWatcher(self.answer_tokenizer, prompt.tokens, sampling.stop, on_text, cancelled)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)  # the generation thread is the only user of the random state
        with self.precision.autocast(self.device):  # autocast is per thread: entered on the generating one
            output = self.model.generate(**inputs, max_new_tokens=sampling.max_tokens,
                                         stopping_criteria=StoppingCriteriaList([watcher]), **options)
        answer_ids = output[:, prompt.tokens:]
        text, stopped = cut_at_stop(decode_answers(self.answer_tokenizer, answer_ids)[0], sampling.stop)
        watcher.send_rest(text)
        ended = stopped or answer_ids.shape[1] < sampling.max_tokens or int(answer_ids[0, -1]) in options["eos_token_id"]
        return Completion(text, "stop" if ended else "length", prompt.tokens, answer_ids.shape[1])


def _context_length(model) -> int:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or config.get_text_config().max_position_embeddings


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` before the first stop string in it, and whether there was one."""
    positions = [position for string in stop if (position := text.find(string)) >= 0]
    return (text[:min(positions)], True) if positions else (text, False)


def _unsure_tail(text: str, stop: tuple[str, ...]) -> int:
    """How many characters at the end of `text` may still change or be cut: an unfinished character, or the
    start of a stop string."""
    held = len(text) - len(text.rstrip(REPLACEMENT))
    for string in stop:
        for length in range(min(len(string) - 1, len(text)), 0, -1):
            if text.endswith(string[:length]):
                held = max(held, length)
                break
    return held


class AnswerWatcher(StoppingCriteria):
    """Looks at the answer after every generated token: sends the text that can no longer change, and stops
    generation at a stop string or when the request is cancelled (its client went away)."""

    def __init__(self, tokenizer, prompt_tokens: int, stop: tuple[str, ...], on_text: Callable[[str], None],
                 cancelled: Callable[[], bool]):
        self.tokenizer, self.prompt_tokens, self.stop = tokenizer, prompt_tokens, stop
        self.on_text, self.cancelled = on_text, cancelled
        self.sent = ""

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        text, stopped = cut_at_stop(decode_answers(self.tokenizer, input_ids[:, self.prompt_tokens:])[0], self.stop)
        if not stopped:
            text = text[: len(text) - _unsure_tail(text, self.stop)]
        self._send(text)
        return torch.full((input_ids.shape[0],), stopped or self.cancelled(), dtype=torch.bool, device=input_ids.device)

    def send_rest(self, answer: str) -> None:
        if not answer.startswith(self.sent):
            raise RuntimeError(f"streamed {self.sent!r}, which does not begin the answer {answer!r}")
        self._send(answer)

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text


class Engine:
    """The served models (the first is the default) and the two threads that answer with them."""

    def __init__(self, models: list[ServedModel]):
        self.models = {model.name: model for model in models}
        self.default = models[0]
        self.preparation = ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self.generation = ThreadPoolExecutor(1, thread_name_prefix="generate")

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            return self.default
        if name not in self.models:
            raise ApiError(404, f"the model {name!r} is not served here; GET /v1/models lists "
                           f"{', '.join(map(repr, self.models))}", "model", "model_not_found")
        return self.models[name]

    def close(self) -> None:
        self.preparation.shutdown(wait=False, cancel_futures=True)
        self.generation.shutdown(wait=True, cancel_futures=True)
