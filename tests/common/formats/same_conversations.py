"""The same conversations written by hand in each format: the generic jsonl, LLaVA/ShareGPT JSON, chat messages
(a jsonl file, and a save_to_disk dataset with embedded images). Each covers one placement case: a single
image, several images in one turn, images in later turns, text only, a system message, placeholders inside
the text. Images are small solid colours of distinct sizes (their token counts differ)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
from PIL import Image

IMAGES = {"red.png": ((220, 30, 30), (40, 30)), "green.png": ((30, 200, 30), (30, 50)),
          "blue.png": ((30, 30, 220), (60, 20))}
SYSTEM = "You are a careful judge of colours."


def image(name: str) -> Image.Image:
    colour, size = IMAGES[name]
    return Image.new("RGB", size, colour)


GENERIC = [
    {"id": "single", "conversations": [
        {"images": ["red.png"], "user": "What colour is this?", "assistant": "red"}]},
    {"id": "several", "conversations": [
        {"images": ["red.png", "green.png"], "user": "Which colours are these?", "assistant": "red and green"}]},
    {"id": "later", "conversations": [
        {"images": ["green.png"], "user": "What colour is this?", "assistant": "green"},
        {"images": ["blue.png", "red.png"], "user": "And these two?", "assistant": "blue, red"},
        {"user": "Were any two the same?", "assistant": "No."}]},
    {"id": "text", "conversations": [
        {"user": "Name a primary colour.", "assistant": "Blue"},
        {"user": "Another one?", "assistant": "Red"}]},
    {"id": "system", "system": SYSTEM, "conversations": [
        {"images": ["blue.png"], "user": "What colour is this?", "assistant": "blue"},
        {"user": "Sure?", "assistant": "Yes"}]},
    {"id": "inline", "conversations": [
        {"images": ["red.png", "blue.png"], "user": "Is <|image_1|> darker than <|image_2|>?", "assistant": "No"},
        {"images": ["green.png"], "user": "Describe this one:\n<|image_1|>", "assistant": "A green square."}]},
]

LLAVA = [
    {"id": "single", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": "red"}]},
    {"id": "several", "image": ["red.png", "green.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhich colours are these?"},
        {"from": "gpt", "value": "red and green"}]},
    {"id": "later", "image": ["green.png", "blue.png", "red.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": "green"},
        {"from": "human", "value": "<image><image>\nAnd these two?"}, {"from": "gpt", "value": "blue, red"},
        {"from": "human", "value": "Were any two the same?"}, {"from": "gpt", "value": "No."}]},
    {"id": "text", "conversations": [
        {"from": "human", "value": "Name a primary colour."}, {"from": "gpt", "value": "Blue"},
        {"from": "human", "value": "Another one?"}, {"from": "gpt", "value": "Red"}]},
    {"id": "system", "image": "blue.png", "conversations": [
        {"from": "system", "value": SYSTEM},
        {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes"}]},
    {"id": "inline", "image": ["red.png", "blue.png", "green.png"], "conversations": [
        {"from": "human", "value": "Is <image> darker than <image>?"}, {"from": "gpt", "value": "No"},
        {"from": "human", "value": "Describe this one:\n<image>"}, {"from": "gpt", "value": "A green square."}]},
]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


IMAGE_ITEM = {"type": "image"}

CHAT = [
    {"id": "single", "images": ["red.png"], "messages": [
        {"role": "user", "content": [IMAGE_ITEM, _text("What colour is this?")]},
        {"role": "assistant", "content": "red"}]},
    {"id": "several", "images": ["red.png", "green.png"], "messages": [
        {"role": "user", "content": [IMAGE_ITEM, IMAGE_ITEM, _text("Which colours are these?")]},
        {"role": "assistant", "content": [_text("red and green")]}]},
    {"id": "later", "images": ["green.png", "blue.png", "red.png"], "messages": [
        {"role": "user", "content": [IMAGE_ITEM, _text("What colour is this?")]},
        {"role": "assistant", "content": "green"},
        {"role": "user", "content": [IMAGE_ITEM, IMAGE_ITEM, _text("And these two?")]},
        {"role": "assistant", "content": "blue, red"},
        {"role": "user", "content": "Were any two the same?"},
        {"role": "assistant", "content": "No."}]},
    {"id": "text", "messages": [
        {"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": [_text("Another one?")]}, {"role": "assistant", "content": "Red"}]},
    {"id": "system", "images": ["blue.png"], "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [IMAGE_ITEM, _text("What colour is this?")]},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes"}]},
    {"id": "inline", "images": ["red.png", "blue.png", "green.png"], "messages": [
        {"role": "user", "content": [_text("Is "), IMAGE_ITEM, _text(" darker than "), IMAGE_ITEM, _text("?")]},
        {"role": "assistant", "content": "No"},
        {"role": "user", "content": [_text("Describe this one:\n"), IMAGE_ITEM]},
        {"role": "assistant", "content": "A green square."}]},
]


def _as_table_row(record: dict) -> dict:
    """A chat record as a dataset row: content always a list of items (one arrow type), images embedded."""
    messages = [
        {"role": m["role"], "content": [_text(m["content"])] if isinstance(m["content"], str) else
         [{"type": item["type"], "text": item.get("text")} for item in m["content"]]}
        for m in record["messages"]
    ]
    return {"id": record["id"], "messages": messages, "images": [image(name) for name in record.get("images", [])]}


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in IMAGES:
        image(name).save(folder / name)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_json_list(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2))  # one record over many lines, as LLaVA's files
    return path


def write_all(root: Path, train: slice, evaluation: slice | None) -> dict[str, dict]:
    """Each format's data, `train` records training and `evaluation` records evaluating (None: no evaluation
    files or split); {format: the flags' values (DataConfig fields)}."""
    write_images(root / "generic" / "images")  # the generic format's images/ folder
    write_images(root / "llava")  # next to the files
    write_images(root / "pictures")  # elsewhere: --image_folder
    write_jsonl(root / "generic" / "colours_train.jsonl", GENERIC[train])
    write_json_list(root / "llava" / "llava_train.json", LLAVA[train])
    write_jsonl(root / "chat" / "train.jsonl", CHAT[train])
    sources = {
        "generic": {"data_dir": str(root / "generic")},
        "llava": {"data_dir": str(root / "llava")},
        "chat": {"train_file": str(root / "chat" / "train.jsonl"), "image_folder": str(root / "pictures")},
        "dataset": {"dataset_path": str(root / "table")},
    }
    features = datasets.Features({
        "id": datasets.Value("string"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
            {"type": datasets.Value("string"), "text": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image()),
    })
    parts = {"train": train} if evaluation is None else {"train": train, "validation": evaluation}
    splits = {split: datasets.Dataset.from_list([_as_table_row(r) for r in CHAT[part]], features=features)
              for split, part in parts.items()}
    datasets.DatasetDict(splits).save_to_disk(str(root / "table"))
    if evaluation is not None:
        write_jsonl(root / "generic" / "colours_val.jsonl", GENERIC[evaluation])
        write_json_list(root / "llava" / "llava_eval.json", LLAVA[evaluation])
        write_jsonl(root / "chat" / "test.jsonl", CHAT[evaluation])
        sources["chat"]["eval_file"] = str(root / "chat" / "test.jsonl")
    return sources
