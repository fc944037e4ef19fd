"""The same preference pairs written by hand in each format: TRL (chat-message prompts, and plain-text
prompts), LLaMA-Factory's sharegpt preference records and RLAIF-V's flat rows. Every format writes the pairs
it can express: RLAIF-V's rows hold one question and at most one image; the others also hold a system message
and earlier turns. Images: tests/common/formats/same_conversations.py's solid colours."""

from __future__ import annotations

from tests.common.formats.same_conversations import SYSTEM

QUESTION = "What colour is this?"

# id -> (chosen, rejected)
ANSWERS = {"single": ("red", "blue"), "inline": ("No", "Yes"), "text": ("Blue", "Green"), "later": ("No.", "Yes.")}
FLAT = ("single", "inline", "text")  # the pairs RLAIF-V's rows can hold

RLAIF = [
    {"idx": "single", "question": QUESTION, "image": "red.png", "chosen": "red", "rejected": "blue",
     "ds_name": "synthetic"},
    {"idx": "inline", "question": "Is <image> darker than blue?", "image": "green.png", "chosen": "No",
     "rejected": "Yes"},
    {"idx": "text", "question": "Name a primary colour.", "chosen": "Blue", "rejected": "Green"},
]

TRL_TEXT = [
    {"id": "single", "prompt": QUESTION, "images": ["red.png"], "chosen": "red", "rejected": "blue"},
    {"id": "inline", "prompt": "Is <image> darker than blue?", "image": "green.png", "chosen": "No", "rejected": "Yes"},
    {"id": "text", "prompt": "Name a primary colour.", "chosen": "Blue", "rejected": "Green"},
]


def _image_item() -> dict:
    return {"type": "image"}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


TRL_MESSAGES = [
    {"id": "single", "images": ["red.png"],
     "prompt": [{"role": "user", "content": [_image_item(), _text(QUESTION)]}],
     "chosen": [{"role": "assistant", "content": [_text("red")]}],
     "rejected": [{"role": "assistant", "content": "blue"}]},
    {"id": "inline", "images": ["green.png"],
     "prompt": [{"role": "user", "content": [_text("Is "), _image_item(), _text(" darker than blue?")]}],
     "chosen": "No", "rejected": "Yes"},
    {"id": "text", "prompt": [{"role": "user", "content": "Name a primary colour."}], "chosen": "Blue",
     "rejected": "Green"},
    {"id": "later", "images": ["green.png", "blue.png", "red.png"],
     "prompt": [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [_image_item(), _text(QUESTION)]},
                {"role": "assistant", "content": "green"},
                {"role": "user", "content": [_image_item(), _image_item(), _text("Are these two the same?")]}],
     "chosen": [{"role": "assistant", "content": "No."}], "rejected": [{"role": "assistant", "content": "Yes."}]},
]

SHAREGPT = [
    {"id": "single", "images": ["red.png"], "conversations": [{"from": "human", "value": f"<image>{QUESTION}"}],
     "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"}},
    {"id": "inline", "images": ["green.png"], "conversations": [{"from": "human", "value": "Is <image> darker than blue?"}],
     "chosen": {"from": "gpt", "value": "No"}, "rejected": {"from": "gpt", "value": "Yes"}},
    {"id": "text", "conversations": [{"from": "human", "value": "Name a primary colour."}],
     "chosen": {"from": "gpt", "value": "Blue"}, "rejected": {"from": "gpt", "value": "Green"}},
    {"id": "later", "system": SYSTEM, "images": ["green.png", "blue.png", "red.png"], "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "green"},
        {"from": "human", "value": "<image><image>\nAre these two the same?"}],
     "chosen": {"from": "gpt", "value": "No."}, "rejected": {"from": "gpt", "value": "Yes."}},
]

FORMATS = {"rlaif": RLAIF, "trl_text": TRL_TEXT, "trl_messages": TRL_MESSAGES, "sharegpt": SHAREGPT}

# The same conversations in the LLaVA format with the chosen answer: what supervised finetuning trains on
LLAVA_CHOSEN = {
    "single": {"id": "single", "image": "red.png", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red"}]},
    "later": {"id": "later", "image": ["green.png", "blue.png", "red.png"], "conversations": [
        {"from": "system", "value": SYSTEM},
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "green"},
        {"from": "human", "value": "<image><image>\nAre these two the same?"}, {"from": "gpt", "value": "No."}]},
}
