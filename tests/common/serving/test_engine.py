"""How the server generates: greedy answers equal the evaluation's (`generate_predictions`), the streamed pieces add
up to the answer, stop strings cut it (and never leak into the stream), a seed makes sampling repeatable, and a
prompt over the context is refused."""

from __future__ import annotations

import pytest
import torch

from common.data import Sample, SampleDataset, Turn
from common.evaluation import generate_predictions
from common.inference import load_for_inference, locate_model
from common.precision import resolve_precision
from common.serving.engine import Sampling, ServedModel, _unsure_tail, cut_at_stop
from common.serving.requests import ApiError
from tests.scripts.e2e import COLOUR_QUESTION, colour_image

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    precision = resolve_precision(False, False, local_rank=0)
    processor, model = load_for_inference(locate_model(str(tiny_model_dir)), precision, torch.device("cpu"), None)
    return processor, model, ServedModel("tiny", processor, model, precision, max_model_len=1000)


def question() -> Sample:
    return Sample("request", [Turn(COLOUR_QUESTION, "", [colour_image("red")])])


def greedy(max_tokens: int = MAX_TOKENS, stop: tuple[str, ...] = ()) -> Sampling:
    return Sampling(max_tokens, 0.0, 1.0, stop, None)


def generate(served_model: ServedModel, sampling: Sampling):
    prompt, _ = served_model.prepare(question(), sampling.max_tokens, MAX_TOKENS)
    pieces = []
    completion = served_model.generate(prompt, sampling, pieces.append, lambda: False)
    return completion, pieces


def test_a_greedy_answer_is_the_evaluations_and_streams_in_pieces_that_add_up(served):
    processor, model, served_model = served
    expected = generate_predictions(model, processor, SampleDataset([question()], lambda row, index, draws: row),
                                    batch_size=1, max_new_tokens=MAX_TOKENS, show_progress=False)[0]["prediction"]
    completion, pieces = generate(served_model, greedy())
    assert completion.text == expected and "".join(pieces) == expected
    assert len(pieces) > 1
    assert completion.finish_reason == "length" and completion.completion_tokens == MAX_TOKENS


def test_a_stop_string_cuts_the_answer_and_never_reaches_the_stream(served):
    served_model = served[2]
    whole = generate(served_model, greedy())[0].text
    stop = whole[3:5]
    completion, pieces = generate(served_model, greedy(stop=(stop, "never there")))
    assert completion.text == whole[: whole.find(stop)] == "".join(pieces)
    assert completion.finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable(served):
    served_model = served[2]
    sampling = Sampling(MAX_TOKENS, 1.5, 0.9, (), seed=7)
    first, pieces = generate(served_model, sampling)
    assert generate(served_model, sampling)[0].text == first.text == "".join(pieces)


def test_a_prompt_over_the_context_is_refused(served):
    served_model = served[2]
    prompt, max_tokens = served_model.prepare(question(), None, MAX_TOKENS)
    assert max_tokens == MAX_TOKENS
    with pytest.raises(ApiError) as caught:
        served_model.prepare(question(), 1000 - prompt.tokens + 1, MAX_TOKENS)
    assert (caught.value.status, caught.value.code) == (400, "context_length_exceeded")
    assert f"the messages take {prompt.tokens} (images included) and {1000 - prompt.tokens + 1} for the answer" \
        in caught.value.message
    long = Sample("request", [Turn("colour " * 1000, "", [])])
    with pytest.raises(ApiError, match="maximum context length is 1000 tokens"):
        served_model.prepare(long, None, MAX_TOKENS)


def test_what_may_still_change_at_the_end_of_a_growing_answer_is_held_back():
    assert cut_at_stop("red. blue. green", (". g", ". b")) == ("red", True)
    assert cut_at_stop("red", ("###",)) == ("red", False)
    assert _unsure_tail("red ##", ("###",)) == 2  # may become the stop string
    assert _unsure_tail("red \ufffd", ()) == 1  # a character whose bytes are not all there
    assert _unsure_tail("red", ("###",)) == 0
