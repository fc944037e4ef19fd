"""Helpers of the end-to-end tests: run the real scripts on tiny synthetic data, check what they leave behind.

Runs of `python SCRIPT ARGS` go through `_launcher.py`, a fork server that has imported the training stack
once (see there): every run is still its own process, at a fraction of the cost. `torchrun` launches are
plain subprocesses. Data sets are written per test module in each task's own schema; images are tiny solid
colours. The tiny model is the session's `tiny_model_dir` (tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from PIL import Image
from safetensors import safe_open

import common.phi3v  # noqa: F401  (registers phi3_v with the Auto classes)
from common.strategy import STRATEGIES as TRAINING_STRATEGIES

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {
    name: REPO_ROOT / f"finetune_hf_trainer_{name}.py" for name in ("docvqa", "hateful_memes", "nlvr2", "ucf101")
}
# The strategies every script is run with: name -> the flags that select it (common/strategy.py's facts)
STRATEGIES = {name: TRAINING_STRATEGIES[name].command_line for name in ("full", "frozen", "lora", "qlora")}
STRATEGY_NAMES = {name: TRAINING_STRATEGIES[name].name for name in STRATEGIES}  # as the run logs it
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
COLOUR_QUESTION = "Which colour is this? Answer red, green or blue."
RUN_TIMEOUT = 300


# What DeepSpeed prints when it probes for a compiler and builds an op (its CPU shared-memory collective): never
# in a run's output
OP_BUILD_LINES = ("compilers.C.base", "gcc ", "built successfully", "deepspeed_shm_comm", "Building extension module")


def script_env() -> dict[str, str]:
    """Environment of every script run: offline, the repository importable (before any packages the caller
    put on PYTHONPATH, which the children keep: gpu_check.sh installs to a side folder), one thread per process."""
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env.update(
        PYTHONPATH=python_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
    )
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fast_args(model_dir: Path, output_dir: Path, *extra: str | Path) -> list[str]:
    """The flags that keep a run to seconds: 2 optimizer steps of 2 samples, 1 crop, 4 generated tokens.
    No warm-up and a large learning rate, so two steps visibly change the trained weights."""
    return [
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
        "--num_crops", "1", "--batch_size", "2", "--batch_size_per_gpu", "2", "--max_steps", "2",
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--lora_rank", "8",
        "--dataloader_num_workers", "0", "--max_new_tokens", "4", "--logging_steps", "1", "--no-tqdm",
        *map(str, extra),
    ]


# ---- running the scripts ------------------------------------------------------------------------------


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def tail(self, lines: int = 150) -> str:
        """The output's last lines: enough to hold a torchrun worker's own last lines above torchrun's summary."""
        return "\n".join((self.stdout + "\n--- stderr ---\n" + self.stderr).splitlines()[-lines:])

    def check(self) -> Result:
        assert self.returncode == 0, f"{' '.join(self.argv)} failed with {self.returncode}:\n{self.tail()}"
        return self


@dataclass
class Running:
    """A script run started by `Launcher.start`: its process (and process group) and where its output goes."""

    argv: list[str]
    pid: int
    stdout: Path
    stderr: Path
    status: Path


class Launcher:
    """Client of `_launcher.py`: `run(script, args)` behaves like `subprocess.run([python, script, *args])`."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.lock = threading.Lock()
        self.count = 0
        self.log = open(work_dir / "launcher.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_launcher.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=work_dir, env=script_env(),
        )
        ready = self.process.stdout.readline()
        assert ready.startswith('{"ready"'), f"launcher failed to start, see {work_dir / 'launcher.log'}"

    def start(self, script: Path, args: list, cwd: Path | None = None) -> Running:
        """Start `python SCRIPT ARGS`; `wait` for its Result. For tests that act on a run while it runs."""
        with self.lock:
            self.count += 1
            stem = self.work_dir / f"run{self.count:03d}"
            request = {
                "argv": [str(script), *map(str, args)], "cwd": str(cwd or self.work_dir),
                "stdout": f"{stem}.out", "stderr": f"{stem}.err", "status": f"{stem}.status", "threads": 1,
            }
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = json.loads(self.process.stdout.readline())["pid"]
        return Running(request["argv"], pid, Path(request["stdout"]), Path(request["stderr"]), Path(request["status"]))

    def wait(self, running: Running, timeout: float = RUN_TIMEOUT) -> Result:
        deadline = time.monotonic() + timeout
        while not running.status.exists():
            if not _alive(running.pid):
                time.sleep(0.2)  # the status is written just before the child exits
                break
            if time.monotonic() > deadline:
                os.killpg(running.pid, signal.SIGKILL)
                break
            time.sleep(0.1)
        returncode = int(running.status.read_text()) if running.status.exists() else -9
        return Result(running.argv, returncode, running.stdout.read_text(), running.stderr.read_text())

    def run(self, script: Path, args: list, cwd: Path | None = None, timeout: float = RUN_TIMEOUT) -> Result:
        return self.wait(self.start(script, args, cwd), timeout)

    def run_many(self, jobs: dict[str, tuple], parallel: int = 2) -> dict[str, Result]:
        """{name: (script, args)} -> {name: Result}, `parallel` runs at a time (one thread each)."""
        with ThreadPoolExecutor(parallel) as pool:
            futures = {name: pool.submit(self.run, *job) for name, job in jobs.items()}
            return {name: future.result() for name, future in futures.items()}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.log.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def torchrun(script: Path, args: list, *launch: str, cwd: Path) -> subprocess.Popen:
    """Start `python -m torch.distributed.run LAUNCH... SCRIPT ARGS` in its own process group; `finish` waits."""
    command = [sys.executable, "-m", "torch.distributed.run", *launch, str(script), *map(str, args)]
    return subprocess.Popen(command, cwd=cwd, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> Result:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers
        stdout, stderr = process.communicate()
    return Result(list(map(str, process.args)), process.returncode, stdout, stderr)


# ---- synthetic data in each task's schema ---------------------------------------------------------------


def colour_image(name: str, size: tuple[int, int] = (32, 24)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[name])


def colour_names(count: int, offset: int = 0) -> list[str]:
    names = list(COLOURS)
    return [names[(offset + i) % len(names)] for i in range(count)]


def docvqa_rows(count: int, offset: int = 0) -> datasets.Dataset:
    """nielsr/docvqa_1200_examples' schema: `id`, `image`, `query` (question per language), `answers` (all
    accepted), `words`, `bounding_boxes`, `answer` (the recipe drops the last three)."""
    names = colour_names(count, offset)
    features = datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "query": {language: datasets.Value("string") for language in ("de", "en", "es", "fr", "it")},
        "answers": datasets.List(datasets.Value("string")),
        "words": datasets.List(datasets.Value("string")),
        "bounding_boxes": datasets.List(datasets.List(datasets.Value("float32"))),
        "answer": {"match_score": datasets.Value("float64"), "matched_text": datasets.Value("string"),
                   "start": datasets.Value("int64"), "text": datasets.Value("string")},
    })
    question = "What colour is the page?"
    return datasets.Dataset.from_dict(
        {
            "id": [f"doc-{offset + i}" for i in range(count)],
            "image": [colour_image(name, (40 + 4 * i, 30)) for i, name in enumerate(names)],
            "query": [{"de": "Welche Farbe?", "en": question, "es": "¿Qué color?", "fr": "Quelle couleur ?",
                       "it": "Che colore?"}] * count,
            "answers": [[name, f"{name} page"] for name in names],
            "words": [[name] for name in names],
            "bounding_boxes": [[[0.0, 0.0, 1.0, 1.0]]] * count,
            "answer": [{"match_score": 1.0, "matched_text": name, "start": 0, "text": name} for name in names],
        },
        features=features,
    )


def write_docvqa(path: Path, num_train: int = 4, num_test: int = 3) -> Path:
    """A save_to_disk copy of nielsr/docvqa_1200_examples with its `train` and `test` splits."""
    datasets.DatasetDict({"train": docvqa_rows(num_train), "test": docvqa_rows(num_test, 1)}).save_to_disk(str(path))
    return path


def cauldron_rows(subset: str, count: int) -> datasets.Dataset:
    """the_cauldron's schema: `images` (1 meme or page, or the NLVR2 pair) and `texts` [{"user", "assistant",
    "source"}, ...]; NLVR2 and DocVQA rows hold two pairs (every second NLVR2 row), as many real rows do."""
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List(
                {"user": datasets.Value("string"), "assistant": datasets.Value("string"), "source": datasets.Value("string")}
            ),
        }
    )
    rows = {"images": [], "texts": []}
    for i, name in enumerate(colour_names(count)):
        if subset == "nlvr2":
            other = colour_names(1, i + 1)[0]
            rows["images"].append([colour_image(name), colour_image(other, (24, 32))])
            pairs = [{"user": f"The left image is {name}. True or False?", "assistant": "True", "source": "nlvr2"}]
            if i % 2:
                pairs.append({"user": f"The right image is {name}. True or False?", "assistant": "False", "source": "nlvr2"})
            rows["texts"].append(pairs)
        elif subset == "docvqa":
            rows["images"].append([colour_image(name, (40 + 4 * i, 30))])
            rows["texts"].append([{"user": "What colour is the page?", "assistant": name, "source": "docvqa"},
                                  {"user": "Name the colour.", "assistant": f"{name} page", "source": "docvqa"}])
        else:
            rows["images"].append([colour_image(name)])
            answer = "yes" if name == "red" else "no"
            rows["texts"].append([{"user": "Is this meme hateful? Answer yes or no.", "assistant": answer, "source": subset}])
    return datasets.Dataset.from_dict(rows, features=features)


def write_cauldron(path: Path, subset: str, count: int, fmt: str) -> Path:
    """A local copy of one the_cauldron subset: a save_to_disk folder ("disk") or a parquet file ("parquet")."""
    rows = cauldron_rows(subset, count)
    if fmt == "parquet":
        path = path.with_suffix(".parquet")
        rows.to_parquet(str(path))
    else:
        datasets.DatasetDict({"train": rows}).save_to_disk(str(path))
    return path


def run_cauldron_task(launcher, tiny_model_dir: Path, root: Path, subset: str, num_rows: int, eval_size: int,
                      data_format: dict[str, str], extra: dict[str, list[str]] | None = None) -> dict:
    """Run a the_cauldron script once per strategy in `data_format` ({strategy: "disk" | "parquet"}), each on
    the same rows saved in that format, with `extra` flags per strategy; {strategy: Result}."""
    data = {fmt: write_cauldron(root / "data", subset, num_rows, fmt) for fmt in ("disk", "parquet")}
    jobs = {
        strategy: (
            SCRIPTS[subset],
            fast_args(tiny_model_dir, root / strategy, "--dataset_path", data[fmt], "--eval_size", str(eval_size),
                      *STRATEGIES[strategy], *(extra or {}).get(strategy, [])),
        )
        for strategy, fmt in data_format.items()
    }
    return launcher.run_many(jobs)


def write_generic(root: Path, splits: dict[str, list[dict]], images: dict[str, Image.Image], name: str = "colour") -> Path:
    """The generic format: {name}_{split}.jsonl with one sample per line, image files under images/."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for file_name, image in images.items():
        image.save(root / "images" / file_name)
    for split, records in splits.items():
        with open(root / f"{name}_{split}.jsonl", "w") as file:
            file.writelines(json.dumps(record) + "\n" for record in records)
    return root


def colour_task(root: Path, num_train: int, num_val: int, size: tuple[int, int] = (32, 24)) -> Path:
    """Name the solid colour of an image, in the generic format: a task a tiny model learns in seconds."""
    splits, images = {}, {}
    for split, count, offset in (("train", num_train, 0), ("val", num_val, 1)):
        splits[split] = []
        for i, colour in enumerate(colour_names(count, offset)):
            file_name = f"{split}-{i}.png"
            images[file_name] = colour_image(colour, size)
            splits[split].append(
                {"id": f"{split}-{i}", "conversations": [{"images": [file_name], "user": COLOUR_QUESTION, "assistant": colour}]}
            )
    return write_generic(root, splits, images)


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def convert_ucf(launcher: Launcher, work_dir: Path, classes=("Archery", "BabyCrawling"), num_frames: int = 8) -> Path:
    """Synthetic UCF-101 videos (tests/test_convert_ucf101.py's helpers) through convert_ucf101.py."""
    video_helpers = load_module(REPO_ROOT / "tests" / "test_convert_ucf101.py", "ucf_video_helpers")
    source = work_dir / "UCF101_subset"
    video_helpers.make_ucf_tree(source, classes=classes, splits=("train", "val"), videos_per_class=2,
                                frames_per_video=8, size=(32, 24))
    out_dir = work_dir / "converted"
    args = ["--src", source, "--out_dir", out_dir, "--num_frames", num_frames, "--num_workers", "1", "--no-tqdm"]
    launcher.run(REPO_ROOT / "convert_ucf101.py", args).check()
    return out_dir


# ---- what a finished run leaves behind ----------------------------------------------------------------


def read_eval(output_dir: Path, when: str) -> dict:
    return json.loads((output_dir / f"eval_{when}.json").read_text())


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118


def assert_model_card(folder: Path, library_name: str, base_model: Path, output_dir: Path):
    """The model card (README.md) of a run's output folder or its merged/, as huggingface_hub reads it: the base
    model, the library that loads the folder, the pipeline, and the scores of the run's evaluation reports."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == str(base_model)
    assert (card.data.library_name, card.data.pipeline_tag) == (library_name, "image-text-to-text")
    before, after = read_eval(output_dir, "before"), read_eval(output_dir, "after")
    metric = "anls" if "anls" in after else "accuracy"
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_value) == (metric, after[metric])
    assert f"| {metric} | {before[metric]:.4f} | {after[metric]:.4f} |" in card.text
    return card


def assert_finished_run(result: Result, output_dir: Path, strategy: str, base_model: Path, num_eval: int) -> None:
    """The recipe's outputs: both evaluations over every eval sample, the curves, a model that loads back
    (official-format weights for full finetuning, a peft adapter for LoRA), the processor and the model card;
    no compiler or op-build line (DeepSpeed's CPU backend)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoProcessor

    result.check()
    assert not [line for line in OP_BUILD_LINES if line in result.stdout + result.stderr], result.tail()
    assert f" with {STRATEGY_NAMES[strategy]} on " in result.stdout  # the flags chose the strategy
    for when in ("before", "after"):  # printed once, by rank 0
        assert len(re.findall(rf"^[A-Z]+ {when} finetuning: \d", result.stdout, re.MULTILINE)) == 1, result.tail()
    for when in ("before", "after"):
        report = read_eval(output_dir, when)
        assert len(report["answers_unique"]) == num_eval == len(report["generated_texts_unique"])
        metric = "anls" if "anls" in report else "accuracy"
        assert set(report) <= {"answers_unique", "generated_texts_unique", metric, "anls_case_insensitive"}
        assert 0.0 <= report[metric] <= 1.0
    assert (output_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    processor = AutoProcessor.from_pretrained(output_dir)
    assert processor.image_processor.num_crops == 1  # --num_crops is saved with the run
    # ours, not the README.md PEFT's save_pretrained writes into an adapter folder
    assert_model_card(output_dir, "transformers" if strategy in ("full", "frozen") else "peft", base_model, output_dir)

    base = tensors(base_model / "model.safetensors")
    if strategy in ("full", "frozen"):
        assert not (output_dir / "adapter_config.json").exists()
        trained = tensors(output_dir / "model.safetensors")
        assert trained.keys() == base.keys()  # the official checkpoint layout
        changed = {key for key in base if not torch.equal(base[key], trained[key])}
        vision_changed = {key for key in changed if ".vision_embed_tokens." in key}
        assert changed - vision_changed, "no language weight was trained"
        assert bool(vision_changed) == (strategy == "full"), sorted(vision_changed)[:5]
        model, info = AutoModelForCausalLM.from_pretrained(output_dir, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert type(model).__name__ == "Phi3VForCausalLM"
        assert model.config.use_cache  # training switches the cache off; the saved model generates with one
    else:
        assert not (output_dir / "model.safetensors").exists()
        config = json.loads((output_dir / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 8
        adapter = tensors(output_dir / "adapter_model.safetensors")
        lora_b = [value for key, value in adapter.items() if "lora_B" in key]
        assert lora_b and any(value.abs().sum() > 0 for value in lora_b), "the adapter was not trained"
        assert any("vision_model" in key for key in adapter)  # the recipe also adapts the CLIP tower
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), output_dir)
        assert any("lora_A" in name for name, _ in model.named_parameters())
