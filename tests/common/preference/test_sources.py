"""common/preference: pairs read from TRL, LLaMA-Factory sharegpt and RLAIF-V records give the same tokens,
their prompt is the supervised prompt of the same conversation, every bad record is one error naming its file
and line, and --max_prompt_length never cuts an image."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoProcessor

from common.collators import IGNORE_INDEX, ConversationEncoder
from common.config import DataConfig
from common.data import open_image
from common.errors import UserError
from common.formats import read_conversation_file
from common.preference.batches import PairEncoder
from common.preference.sources import load_preference_pairs, read_preference_file
from tests.common.formats.same_conversations import image, write_images, write_json_list, write_jsonl
from tests.common.preference.same_pairs import ANSWERS, FLAT, FORMATS, LLAVA_CHOSEN, RLAIF


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir, num_crops=1)


@pytest.fixture
def folder(tmp_path) -> Path:
    write_images(tmp_path)
    return tmp_path


def opened(pair):
    for turn in pair.turns:
        turn.images = [open_image(source, pair.id) for source in turn.images]
    return pair


def encoded(processor, pairs, **limits) -> dict:
    """{pair id: (prompt ids, chosen ids, rejected ids, images kept)}"""
    encoder = PairEncoder(processor, **limits)
    result = {}
    for pair in pairs:
        (one,), _ = encoder.encode([opened(pair)])
        result[pair.id] = (one.prompt, one.chosen, one.rejected, len(one.images))
    return result


def test_the_formats_give_the_same_pairs(folder, processor):
    tokens = {}
    for name, records in FORMATS.items():
        write = write_json_list if name == "sharegpt" else write_jsonl
        path = write(folder / f"{name}.{'json' if name == 'sharegpt' else 'jsonl'}", records)
        pairs = read_preference_file(path)
        assert [(pair.id, pair.chosen, pair.rejected) for pair in pairs] == [
            (record.get("id", record.get("idx")), *ANSWERS[record.get("id", record.get("idx"))]) for record in records
        ]
        tokens[name] = encoded(processor, pairs)
    assert set(tokens["rlaif"]) == set(FLAT)
    for name in FORMATS:
        assert tokens[name] == {pair_id: tokens["trl_messages"][pair_id] for pair_id in tokens[name]}, name
    assert tokens["sharegpt"]["later"][3] == 3  # all images of the conversation kept


@pytest.mark.parametrize("pair_id", sorted(LLAVA_CHOSEN))
def test_the_prompt_is_the_supervised_prompt(folder, processor, pair_id):
    """prompt + chosen is what supervised finetuning trains on for the conversation answered with the chosen
    answer (the same tokens, images and system message); the learnt tokens are the last answer's."""
    pair = next(p for p in read_preference_file(write_jsonl(folder / "pairs.jsonl", FORMATS["sharegpt"])) if p.id == pair_id)
    sample = read_conversation_file(write_jsonl(folder / "sft.jsonl", [LLAVA_CHOSEN[pair_id]]))[0]
    for turn in sample.turns:
        turn.images = [open_image(source, sample.id) for source in turn.images]
    (ids,), (labels,), _ = ConversationEncoder(processor).encode_batch([sample], training=True)
    prompt, chosen, rejected, _ = encoded(processor, [pair])[pair_id]
    assert prompt + chosen == ids
    assert labels[len(prompt):] == chosen and labels[len(prompt) - 1] == IGNORE_INDEX
    assert rejected == processor.tokenizer(ANSWERS[pair_id][1] + "<|end|>\n<|endoftext|>", add_special_tokens=False).input_ids


def test_a_dataset_with_embedded_images_reads_as_its_files(folder, processor):
    rows = [{**record, "image": image(record["image"]) if "image" in record else None} for record in RLAIF]
    features = datasets.Features({"idx": datasets.Value("string"), "question": datasets.Value("string"),
                                  "image": datasets.Image(), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string"), "ds_name": datasets.Value("string")})
    table = datasets.Dataset.from_list([{name: row.get(name) for name in features} for row in rows], features=features)
    datasets.DatasetDict({"train": table, "validation": table.select([0])}).save_to_disk(str(folder / "rlaif"))
    train, evaluation = load_preference_pairs(DataConfig(str(folder / "rlaif"), None, 1, None, 0))
    expected = encoded(processor, read_preference_file(write_jsonl(folder / "rlaif.jsonl", RLAIF)))
    assert encoded(processor, [train[i] for i in range(len(train))]) == expected
    assert [evaluation[i].id for i in range(len(evaluation))] == ["single"]
    assert train.has_text_only_samples()


def test_data_dir_files_evaluate_by_name(folder):
    write_jsonl(folder / "pairs_train.jsonl", FORMATS["trl_messages"])
    write_jsonl(folder / "pairs_val.jsonl", RLAIF)
    train, evaluation = load_preference_pairs(DataConfig(None, str(folder), 1, None, 0))
    assert (len(train), len(evaluation)) == (4, 3)


def test_without_evaluation_pairs_the_first_are_held_out(folder):
    path = write_jsonl(folder / "pairs.jsonl", FORMATS["trl_messages"])
    train, evaluation = load_preference_pairs(DataConfig(None, None, 1, None, 0, train_file=str(path)))
    assert [evaluation[0].id] == ["single"] and len(train) == 3


SINGLE = FORMATS["trl_messages"][0]
BAD_RECORDS = [
    ({**SINGLE, "chosen": ""}, "'chosen' must be a non-empty text"),
    ({**SINGLE, "rejected": [{"role": "user", "content": "x"}]}, "'rejected' must be an answer (a 'assistant' message), got a 'user' message"),
    ({**SINGLE, "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "'chosen' must hold one assistant message, got 2"),
    ({**SINGLE, "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "prompt[1]: the prompt must end with a user message"),
    ({**SINGLE, "images": ["red.png", "blue.png"]}, "1 image placeholder(s)"),
    ({**SINGLE, "images": ["missing.png"]}, "image missing.png does not exist"),
    ({**SINGLE, "image": "red.png"}, "give the images under one key, not 'images' and 'image'"),
    ({"prompt": "Hi", "chosen": "a"}, "'rejected' must be a non-empty text"),
]


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS, ids=[message[:30] for _, message in BAD_RECORDS])
def test_a_bad_record_is_one_error_naming_its_file_and_line(folder, record, message):
    path = write_jsonl(folder / "pairs.jsonl", [SINGLE, record])
    with pytest.raises(UserError) as error:
        read_preference_file(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value), str(error.value)
    assert "\n" not in str(error.value) and "(read as TRL preference" in str(error.value)


@pytest.mark.parametrize(("records", "message"), [
    (FORMATS["sharegpt"][:1] + [{**FORMATS["sharegpt"][0], "chosen": {"from": "human", "value": "red"}}],
     "'chosen' must be an answer (a 'gpt' message), got a 'human' message"),
    (RLAIF[:1] + [{"question": "Which?", "chosen": "a", "rejected": None}], "'rejected' must be a non-empty text"),
    ([{"question_text": "?", "answer": "a"}], "unknown format, a record with keys ['answer', 'question_text']"),
])
def test_other_formats_name_the_bad_line(folder, records, message):
    path = write_jsonl(folder / "pairs.jsonl", records)
    with pytest.raises(UserError) as error:
        read_preference_file(path)
    assert str(error.value).startswith(f"{path}:{len(records)}: ") and message in str(error.value), str(error.value)


def test_a_prompt_cut_inside_an_image_is_refused_and_whole_images_are_dropped(folder, processor):
    pair = next(p for p in read_preference_file(write_jsonl(folder / "p.jsonl", FORMATS["trl_messages"])) if p.id == "later")
    prompt, *_ = encoded(processor, [pair])["later"]
    spans = [i for i, token in enumerate(prompt) if token < 0 and prompt[i - 1] != token]
    second_image = spans[1]
    with pytest.raises(UserError) as error:
        encoded(processor, [pair], max_prompt_length=len(prompt) - second_image - 1)
    assert str(error.value).startswith("pair later: --max_prompt_length") and "inside the span of image 1" in str(error.value)
    kept, *_, images = encoded(processor, [pair], max_prompt_length=len(prompt) - second_image)["later"]
    assert kept == prompt[second_image:] and images == 2  # the first image is cut off whole


def test_a_pair_longer_than_max_length_is_refused(folder, processor):
    pair = read_preference_file(write_jsonl(folder / "p.jsonl", FORMATS["trl_text"]))[0]
    prompt, chosen, _, _ = encoded(processor, [pair])["single"]
    with pytest.raises(UserError, match=f"pair single has {len(prompt) + len(chosen)} tokens"):
        encoded(processor, [pair], max_length=len(prompt) + 1)


def test_the_files_are_read_as_json_lists_too(folder):
    path = folder / "pairs.json"
    path.write_text(json.dumps(FORMATS["trl_text"], indent=2))
    assert [pair.id for pair in read_preference_file(path)] == ["single", "inline", "text"]
