"""common/collators.py: the recipe's token layout for training and the left-padded generation batches, with
the tiny byte-level tokenizer and with Phi-3.5-vision's real one."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from common.collators import IGNORE_INDEX, Phi3VEvalCollator, Phi3VTrainCollator
from common.data import Sample, Turn, image_tags

END = "<|end|>\n"
EOS = "<|endoftext|>"


REAL_PROCESSOR = Path(__file__).resolve().parents[1] / "fixtures" / "phi35v_processor"


@pytest.fixture(scope="module", params=["tiny", "real"])
def processor(request, tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir if request.param == "tiny" else REAL_PROCESSOR, num_crops=4)


def tokens(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False).input_ids


def prompt_of(user_content: str) -> str:
    """Phi-3.5's chat template for one user message with the generation prompt."""
    return f"<|user|>\n{user_content}<|end|>\n<|assistant|>\n"


def prompt_ids(processor, user_content: str, images) -> list[int]:
    return processor(prompt_of(user_content), images=images or None).input_ids[0].tolist()


def image_token_count(processor, image) -> int:
    return processor.image_processor([image])["num_img_tokens"][0]


RED = Image.new("RGB", (336, 336), (220, 20, 20))
TALL = Image.new("RGB", (300, 500), (20, 220, 20))
WIDE = Image.new("RGB", (700, 200), (20, 20, 220))


def single_turn(sample_id="s1", image=RED, question="What is shown?", answer="A red square") -> Sample:
    return Sample(sample_id, [Turn(question, answer, [image] if image is not None else [])])


def test_image_tags_are_concatenated_from_1():
    assert image_tags(0) == ""
    assert image_tags(2) == "<|image_1|><|image_2|>"


def test_real_tokenizer_encodes_as_the_recipes_stack():
    """Measured under transformers 4.45 (the recipe's stack): the "▁" (29871) before a newline after a tag."""
    tokenizer = AutoProcessor.from_pretrained(REAL_PROCESSOR).tokenizer
    assert tokenizer("<|user|>\nHi there<|end|>\n<|assistant|>\n").input_ids == [
        1, 32010, 29871, 13, 18567, 727, 32007, 29871, 13, 32001
    ]
    assert tokenizer("yes<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids == [4874, 32007, 29871, 13, 32000]
    assert tokenizer("").input_ids == [1]  # the empty chunk between two image tags


def test_real_processor_puts_bos_after_every_image():
    """The original processor's layout with the real tokenizer: every text chunk (the empty one between two
    tags too) tokenized with BOS, each tag a span of -N."""
    processor = AutoProcessor.from_pretrained(REAL_PROCESSOR, num_crops=1)
    image = Image.new("RGB", (40, 30))
    prompt = "<|user|>\n<|image_1|><|image_2|>\nIs it true?<|end|>\n<|assistant|>\n"
    span = 313  # (1 * 1 + 1) * 144 + 1 + (1 + 1) * 12 for one 336x336 crop
    assert processor(prompt, [image, image]).input_ids[0].tolist() == (
        [1, 32010, 29871, 13] + [-1] * span + [1] + [-2] * span
        + [1, 29871, 13, 3624, 372, 1565, 29973, 32007, 29871, 13, 32001]
    )


def test_chat_template_is_phi3s(processor):
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\nhi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == prompt_of("<|image_1|>\nhi")


# ---- training batches ---------------------------------------------------------------------------------


def test_single_turn_layout_is_the_recipes(processor):
    """ids = processor(prompt, images).input_ids + tokenizer(answer<|end|>\\n<|endoftext|>), labels -100 then answer."""
    batch = Phi3VTrainCollator(processor)([single_turn()])
    expected_prompt = prompt_ids(processor, "<|image_1|>\nWhat is shown?", [RED])
    assert processor.tokenizer.convert_tokens_to_ids("<|assistant|>") in expected_prompt[-2:]
    expected_answer = tokens(processor, "A red square" + END + EOS)
    ids = batch["input_ids"][0].tolist()
    assert ids == expected_prompt + expected_answer
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(expected_prompt) + expected_answer
    assert batch["attention_mask"][0].tolist() == [1] * len(ids)
    # the prompt holds the image span (all -100 in labels) and starts with BOS
    assert ids.count(-1) == image_token_count(processor, RED)
    assert ids[0] == processor.tokenizer.bos_token_id
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.long and batch[key].shape == (1, len(ids))


def test_pixel_values_are_the_image_processors(processor):
    batch = Phi3VTrainCollator(processor)([single_turn()])
    expected = processor.image_processor([RED])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["image_sizes"], expected["image_sizes"])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_sizes"}


def test_the_final_endoftext_is_labelled_although_it_is_the_pad_token(processor):
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # as in the real checkpoint
    batch = Phi3VTrainCollator(processor)([single_turn(), single_turn("s2", answer="A much longer answer here")])
    short_length = int(batch["attention_mask"][0].sum())
    assert short_length < batch["input_ids"].shape[1]  # row 0 is padded
    for row in range(2):
        last = int(batch["attention_mask"][row].sum()) - 1
        assert batch["input_ids"][row, last] == tokenizer.eos_token_id
        tail = tokens(processor, END + EOS)
        assert batch["labels"][row, last + 1 - len(tail) : last + 1].tolist() == tail


def test_right_padding(processor):
    samples = [single_turn("short", image=None, answer="no"), single_turn("long", answer="a long long answer")]
    batch = Phi3VTrainCollator(processor)(samples)
    alone = Phi3VTrainCollator(processor)([samples[0]])
    length = alone["input_ids"].shape[1]
    width = batch["input_ids"].shape[1]
    assert width > length
    assert torch.equal(batch["input_ids"][0, :length], alone["input_ids"][0])
    assert torch.equal(batch["labels"][0, :length], alone["labels"][0])
    assert batch["input_ids"][0, length:].tolist() == [processor.tokenizer.pad_token_id] * (width - length)
    assert batch["attention_mask"][0].tolist() == [1] * length + [0] * (width - length)
    assert batch["labels"][0, length:].tolist() == [IGNORE_INDEX] * (width - length)
    assert batch["attention_mask"][1].all()  # the longest row is not padded


def test_multi_turn_layout_numbers_each_turns_images_from_1(processor):
    """phi3v_dataset.py: every turn its own processor call (tags from 1, BOS first), every answer closed by
    <|end|>\n<|endoftext|>; a turn without images keeps the newline after the (absent) tags."""
    sample = Sample("conv", [
        Turn("Describe the first image.", "Red", [RED]),
        Turn("And the second?", "Green", [TALL, WIDE]),
        Turn("Which was first?", "The red one"),
    ])
    batch = Phi3VTrainCollator(processor)([sample])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()

    parts = [
        (prompt_ids(processor, "<|image_1|>\nDescribe the first image.", [RED]), False),
        (tokens(processor, "Red" + END + EOS), True),
        (prompt_ids(processor, "<|image_1|><|image_2|>\nAnd the second?", [TALL, WIDE]), False),
        (tokens(processor, "Green" + END + EOS), True),
        (prompt_ids(processor, "\nWhich was first?", []), False),
        (tokens(processor, "The red one" + END + EOS), True),
    ]
    assert ids == [token for part, _ in parts for token in part]
    assert labels == [token if labelled else IGNORE_INDEX for part, labelled in parts for token in part]
    assert ids.count(-1) == image_token_count(processor, RED) + image_token_count(processor, TALL)
    assert ids.count(-2) == image_token_count(processor, WIDE)
    assert ids.count(processor.tokenizer.eos_token_id) == 3
    assert ids.count(processor.tokenizer.bos_token_id) == 3 + 3  # one per turn, one after each image
    assert torch.equal(batch["image_sizes"], processor.image_processor([RED, TALL, WIDE])["image_sizes"])


def test_bare_text_turns_are_the_text_alone(processor):
    """the_cauldron scripts (NLVR2): later turns are `{user}` without images or newline."""
    sample = Sample("nlvr2", [Turn("Is it so?", "True", [RED, TALL]), Turn("Really?", "False")], bare_text_turns=True)
    ids = Phi3VTrainCollator(processor)([sample])["input_ids"][0].tolist()
    expected = (prompt_ids(processor, "<|image_1|><|image_2|>\nIs it so?", [RED, TALL]) + tokens(processor, "True" + END + EOS)
                + prompt_ids(processor, "Really?", []) + tokens(processor, "False" + END + EOS))
    assert ids == expected


def test_pixel_values_follow_sample_order_and_mix_with_image_free_samples(processor, tiny_model_dir):
    samples = [
        Sample("two", [Turn("Same scene?", "no", [TALL, WIDE])]),
        single_turn("none", image=None, question="Just text.", answer="ok"),
        single_turn("one", image=RED),
    ]
    batch = Phi3VTrainCollator(processor)(samples)
    expected = processor.image_processor([TALL, WIDE, RED])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["image_sizes"], expected["image_sizes"])
    ids = batch["input_ids"]
    assert ids[0].tolist().count(-1) == expected["num_img_tokens"][0]
    assert ids[0].tolist().count(-2) == expected["num_img_tokens"][1]
    assert not (ids[1] < 0).any()
    assert ids[2].tolist().count(-1) == expected["num_img_tokens"][2] and not (ids[2] == -2).any()
    # two images in one user message: both tags come first, numbered 1 and 2
    first_image = ids[0].tolist().index(-1)
    assert ids[0].tolist().index(-2) > first_image
    if processor.tokenizer.vocab_size > 1000:
        return  # the tiny model's vocabulary is the tiny tokenizer's
    # and the model accepts the layout (each span matches its image's features)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_no_pixel_values_without_images(processor):
    batch = Phi3VTrainCollator(processor)([single_turn("a", image=None), single_turn("b", image=None, answer="x")])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert not (batch["input_ids"] < 0).any()


def test_max_length_names_the_sample_and_the_lengths(processor):
    sample = single_turn("too-long")
    length = Phi3VTrainCollator(processor)([sample])["input_ids"].shape[1]
    assert Phi3VTrainCollator(processor, max_length=length)([sample])["input_ids"].shape[1] == length
    with pytest.raises(ValueError) as info:
        Phi3VTrainCollator(processor, max_length=length - 1)([single_turn("fine", image=None), sample])
    message = str(info.value)
    assert "sample too-long" in message
    assert f"has {length} tokens" in message and f"--max_length {length - 1}" in message


def test_a_tag_typed_into_the_text_names_the_sample(processor):
    sample = Sample("typed-tag", [Turn("look at <|image_2|> please", "ok", [RED])])
    with pytest.raises(ValueError, match=r"sample typed-tag: prompt has 2 image tags but 1 image was given"):
        Phi3VTrainCollator(processor)([sample])


# ---- evaluation batches -------------------------------------------------------------------------------


def test_eval_batch_is_left_padded_prompts_without_the_last_answer(processor):
    samples = [
        single_turn("long", image=WIDE, question="What colour is this long image?", answer="blue"),
        Sample("multi", [Turn("First?", "one"), Turn("Second?", "two")], references=["two", "2"]),
    ]
    batch = Phi3VEvalCollator(processor)(samples)
    assert batch["ids"] == ["long", "multi"]
    assert batch["references"] == [["blue"], ["two", "2"]]

    first = prompt_ids(processor, "<|image_1|>\nWhat colour is this long image?", [WIDE])
    history = [{"role": "user", "content": "\nFirst?"}, {"role": "assistant", "content": "one" + END + EOS},
               {"role": "user", "content": "\nSecond?"}]
    second = processor.tokenizer(processor.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)).input_ids
    width = batch["input_ids"].shape[1]
    assert width == max(len(first), len(second))
    rows = [first, second]
    for row, expected in enumerate(rows):
        pad = width - len(expected)
        assert batch["input_ids"][row].tolist() == [processor.tokenizer.pad_token_id] * pad + expected
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(expected)
        assert processor.tokenizer.convert_tokens_to_ids("<|assistant|>") in expected[-2:]  # ready to answer
    assert batch["attention_mask"][1, 0] == 0  # the shorter row is padded on the left
    assert "labels" not in batch
    assert torch.equal(batch["pixel_values"], processor.image_processor([WIDE])["pixel_values"])
    assert torch.equal(batch["image_sizes"], processor.image_processor([WIDE])["image_sizes"])


def test_eval_batch_without_images(processor):
    batch = Phi3VEvalCollator(processor)([single_turn("t", image=None, answer="yes")])
    assert set(batch) == {"input_ids", "attention_mask", "ids", "references"}
    assert batch["input_ids"][0].tolist() == prompt_ids(processor, "\nWhat is shown?", [])
    assert batch["references"] == [["yes"]]
