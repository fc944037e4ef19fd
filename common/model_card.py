"""The model card a finished run leaves in `output_dir/README.md` (and in `output_dir/merged/` with --merge), and
--push_to_hub's final upload.

The card is Hugging Face's model-card format: YAML metadata that the hub and `huggingface_hub.ModelCard` read
(`base_model`, `library_name`: `peft` for an adapter, `transformers` for full weights; `pipeline_tag`, `tags`,
`datasets` where the data came from the hub, `model-index` with the score after training) and a body saying what
was trained, how well, how to use it and the recipe it follows. The facts come from the run's configuration and
from what the run wrote into `output_dir` (the evaluation reports, `trainer_state.json`, `adapter_config.json`),
so the card states what was saved. It is written last: PEFT's `save_pretrained` writes a README.md of its own
into an adapter folder, which ours replaces.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .config import RunConfig
from .distributed import Distributed
from .strategy import TrainingStrategy
from .task import Task

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
PIPELINE_TAG = "image-text-to-text"
RECIPE_URL = "https://github.com/microsoft/PhiCookBook/blob/main/md/03.FineTuning/FineTuning_Vision.md"
# Local folders of these official checkpoints (an offline cluster's download) are named on the card by hub id
OFFICIAL_MODELS = ("Phi-3.5-vision-instruct", "Phi-3-vision-128k-instruct")
# What --push_to_hub leaves out of the upload, as the Trainer's own push: checkpoints and temporary files
PUSH_IGNORE_PATTERNS = ["_*", "checkpoint-*"]


@dataclass(frozen=True)
class Scores:
    """The task metric before and after training (None: not evaluated) and the best during training."""

    metric: str
    eval_samples: int
    before: dict[str, float]  # every figure of eval_before.json ({} when skipped)
    after: dict[str, float]
    best: float | None = None  # --keep_best / evaluations during training: the best score and its step
    best_step: int | None = None
    best_is_final: bool = False  # --keep_best: the final model is the best step's


@dataclass(frozen=True)
class TrainedModel:
    """What a card describes: the run's facts, gathered when it has finished."""

    name: str  # the repository name: --hub_model_id, or the output folder's name
    location: str  # the output folder, as given
    hub_model_id: str | None  # where --push_to_hub pushed it
    task: str
    base_model: str
    adapter: dict | None  # adapter_config.json of a LoRA/QLoRA output, None for full weights
    strategy: TrainingStrategy
    precision: str
    data: str  # where the data came from, in words
    datasets: tuple[str, ...]  # hub dataset ids, where the data came from the hub
    train_samples: int
    hyperparameters: dict[str, object]
    steps: int
    max_steps: int
    train_loss: float | None
    hardware: str
    scores: Scores


def base_model_id(name_or_path: str) -> str:
    """The hub id of the base model: as given, or for a local folder of an official checkpoint its hub id; any
    other local folder is named by its path (the card then says so)."""
    path = Path(name_or_path)
    if not path.is_dir():
        return name_or_path
    return f"microsoft/{path.name}" if path.name in OFFICIAL_MODELS else name_or_path


def model_card(model: TrainedModel, merged: bool = False) -> ModelCard:
    """The card of the run's output folder, or of its `merged/` folder (the adapter merged into full weights)."""
    is_adapter = model.adapter is not None and not merged
    tags = ["phi3_v", "vision", "multimodal", model.task.lower().replace(" ", "-")]
    if model.adapter is not None:
        tags += ["qlora" if model.strategy.quantize_4bit else "lora"] + (["merged"] if merged else [])
    data = ModelCardData(
        base_model=model.base_model,
        library_name="peft" if is_adapter else "transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        datasets=list(model.datasets) or None,
        model_name=model.name,
        eval_results=_eval_results(model) or None,
    )
    body = "\n\n".join([
        _summary(model, is_adapter, merged),
        _what_was_trained(model),
        _results(model.scores),
        _usage(model, is_adapter, merged),
        _recipe(),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _eval_results(model: TrainedModel) -> list[EvalResult]:
    scores = model.scores
    if scores.metric not in scores.after:
        return []
    return [EvalResult(
        task_type=PIPELINE_TAG,
        dataset_type=model.datasets[-1] if model.datasets else "custom",  # the evaluation set's, listed last
        dataset_name=f"{model.task} evaluation set ({scores.eval_samples} samples)",
        metric_type=scores.metric,
        metric_name=scores.metric.upper() if scores.metric == "anls" else scores.metric,
        metric_value=scores.after[scores.metric],
    )]


def _summary(model: TrainedModel, is_adapter: bool, merged: bool) -> str:
    base = (f"`{model.base_model}` (a local folder)" if Path(model.base_model).is_dir()
            else f"[{model.base_model}](https://huggingface.co/{model.base_model})")
    trained = f"on {model.task} with the Hugging Face Trainer, following Microsoft's Phi-3.5-vision finetuning recipe"
    if is_adapter:
        what = f"A {model.strategy.name} adapter for {base}, trained {trained}."
    elif merged:
        what = (f"{base} with a {model.strategy.name} adapter merged into its weights (the adapter is the parent folder's), "
                f"trained {trained}.")
    else:
        what = f"{base} finetuned {trained} ({model.strategy.name})."
    return f"# {model.name}\n\n{what}"


def _what_was_trained(model: TrainedModel) -> str:
    rows = [
        ("task", model.task),
        ("data", model.data),
        ("training samples", f"{model.train_samples:,}"),
        ("evaluation samples", f"{model.scores.eval_samples:,}"),
        ("strategy", model.strategy.name),
        ("precision", model.precision),
        *((f"`--{flag}`", value) for flag, value in model.hyperparameters.items()),
        ("optimizer steps", f"{model.steps:,} of {model.max_steps:,}"),
        *((("final training loss", f"{model.train_loss:.4f}"),) if model.train_loss is not None else ()),
        ("hardware", model.hardware),
    ]
    if model.adapter is not None:
        rows.append(("LoRA", f"rank {model.adapter['r']}, alpha {model.adapter['lora_alpha']}, "
                             f"dropout {model.adapter['lora_dropout']}"))
    return "## What was trained\n\n" + _table(("", ""), rows)


def _results(scores: Scores) -> str:
    rows = []
    for figure in dict.fromkeys([*scores.before, *scores.after]):  # in the reports' order, the metric first
        before, after = scores.before.get(figure), scores.after.get(figure)
        rows.append((figure, _score(before), _score(after)))
    text = (f"## Results\n\nGreedy answers to the {scores.eval_samples:,} evaluation samples, scored as the recipe "
            f"scores them (`eval_before.json` and `eval_after.json` hold every answer):\n\n")
    text += _table(("metric", "before finetuning", "after finetuning"), rows)
    if scores.best is not None:
        final = " the final model is that step's (`--keep_best`);" if scores.best_is_final else ""
        text += (f"\n\nBest {scores.metric} during training: {scores.best:.4f} at step {scores.best_step};{final} "
                 "scored on the evaluation samples used during training (`trainer_state.json` holds every score).")
    return text


def _usage(model: TrainedModel, is_adapter: bool, merged: bool) -> str:
    folder = f"{model.location}/merged" if merged else model.location
    base_flag = f" --base_model {model.base_model}" if is_adapter else ""
    load = (f'base = AutoModelForCausalLM.from_pretrained("{model.base_model}", dtype="auto")\n'
            f'model = PeftModel.from_pretrained(base, "{folder}").merge_and_unload()' if is_adapter
            else f'model = AutoModelForCausalLM.from_pretrained("{folder}", dtype="auto")')
    text = f"""## How to use

With the project that trained it (its `predict.py` and `common` package: Phi-3-V built in, no remote code):

```bash
python predict.py --model {folder}{base_flag} --image page.png --prompt "What is the total amount?"
python predict.py --model {folder}{base_flag} --data_file questions.jsonl --output answers.jsonl --metric {model.scores.metric}
```

In Python, with the project's `common` package importable (from a clone of the project):

```python
import common  # registers the native Phi-3-V classes with transformers (no trust_remote_code)
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor
{"from peft import PeftModel" if is_adapter else ""}
processor = AutoProcessor.from_pretrained("{folder}")
{load}
prompt = processor.tokenizer.apply_chat_template(
    [{{"role": "user", "content": "<|image_1|>\\nWhat is the total amount?"}}], tokenize=False, add_generation_prompt=True
)
inputs = processor(prompt, [Image.open("page.png")], return_tensors="pt")
stop = [processor.tokenizer.convert_tokens_to_ids("<|end|>"), processor.tokenizer.eos_token_id]
output = model.generate(**inputs, max_new_tokens=64, do_sample=False, eos_token_id=stop)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```
"""
    if model.hub_model_id:
        in_python = ' (with `subfolder="merged"` in Python)' if merged else ""
        text += f"\nFrom the hub, use `{model.hub_model_id}` in place of the folder{in_python}.\n"
    if is_adapter:
        return text + ("\nvLLM takes no LoRA adapter for Phi-3-V: train with `--merge` and serve the `merged/` folder, "
                       "the adapter merged into full weights.")
    copy_code = (f"cp {model.base_model}/*.py {folder}/" if Path(model.base_model).is_dir()
                 else f'hf download {model.base_model} --include "*.py" --local-dir {folder}')
    return text + f"""
Serving with vLLM: the weights are in the official format; vLLM reads Phi-3-V's processor through the base model's
remote code, so copy its `*.py` files next to the weights first.

```bash
{copy_code}
vllm serve {folder} --trust-remote-code --max-model-len 4096 --limit-mm-per-prompt '{{"image": 2}}'
```"""


def _recipe() -> str:
    return (f"## Recipe\n\nTrained as [Microsoft's Phi-3.5-vision finetuning recipe]({RECIPE_URL}) trains: its "
            "data, prompts, labels, metrics, optimizer (AdamW, betas 0.9/0.95, eps 1e-7, linear schedule) and "
            "strategies (full finetuning under DeepSpeed ZeRO-2, LoRA, QLoRA), on today's transformers and torch. "
            "The project's `docs/differences-from-the-recipe.md` lists where it differs and why.")


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _score(value: float | None) -> str:
    return "not evaluated" if value is None else f"{value:.4f}"


# ---- gathering the facts at the end of a run, writing the cards, pushing -------------------------------------


def describe_run(task: Task, config: RunConfig, distributed: Distributed, train_samples: int,
                 eval_samples: int) -> TrainedModel:
    """The facts of a finished run: its configuration and what it wrote into output_dir."""
    output_dir = Path(config.outputs.output_dir)
    state = _read_json(output_dir / "trainer_state.json") or {}
    losses = [entry["train_loss"] for entry in state.get("log_history", []) if "train_loss" in entry]
    local_data = config.data.local_source
    datasets = () if local_data else task.hub_datasets(config.task_options)
    training = config.training
    hyperparameters = {
        "learning_rate": training.learning_rate, "batch_size": training.batch_size,
        "batch_size_per_gpu": training.batch_size_per_gpu, "num_train_epochs": training.num_train_epochs,
        **({"max_steps": training.max_steps} if training.max_steps > 0 else {}),
        "warmup_steps": training.warmup_steps, "wd": training.weight_decay, "num_crops": config.model.num_crops,
        "seed": training.seed,
    }
    return TrainedModel(
        name=config.outputs.hub_model_id or output_dir.resolve().name,
        location=str(config.outputs.output_dir).rstrip("/") or "/",
        hub_model_id=config.outputs.hub_model_id,
        task=task.name,
        base_model=base_model_id(config.model.name_or_path),
        adapter=_read_json(output_dir / "adapter_config.json") if config.strategy.lora else None,
        strategy=config.strategy,
        precision=config.precision.describe(),
        data=f"`{local_data}` (local)" if local_data else ", ".join(f"`{name}`" for name in datasets) or "the hub",
        datasets=datasets,
        train_samples=train_samples,
        hyperparameters=hyperparameters,
        steps=state.get("global_step", 0),
        max_steps=state.get("max_steps", 0),
        train_loss=losses[-1] if losses else None,
        hardware=_hardware(distributed),
        scores=Scores(
            metric=task.metric.name,
            eval_samples=eval_samples,
            before=_figures(output_dir / "eval_before.json"),
            after=_figures(output_dir / "eval_after.json"),
            best=state.get("best_metric"),
            best_step=state.get("best_global_step"),
            best_is_final=config.during_training.keep_best,
        ),
    )


def write_model_cards(model: TrainedModel, output_dir: Path, merged: bool) -> list[Path]:
    """output_dir/README.md, and merged/README.md after --merge; written whole (a temporary file renamed)."""
    written = []
    for folder, is_merged in ((output_dir, False), *(((output_dir / "merged", True),) if merged else ())):
        path = folder / CARD_FILE
        temporary = path.with_name(f"{CARD_FILE}.tmp")
        temporary.write_text(str(model_card(model, merged=is_merged)))
        temporary.replace(path)
        written.append(path)
    return written


def push_to_hub(output_dir: Path, hub_model_id: str | None, api: HfApi | None = None) -> str:
    """Upload output_dir (model, processor, card, evaluations, merged/; no checkpoints) to the repository the
    Trainer pushes to: --hub_model_id, or the output folder's name under the user's account. Returns its id."""
    api = api or HfApi()
    repo_id = api.create_repo(hub_model_id or output_dir.resolve().name, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message="End of training",
                      ignore_patterns=PUSH_IGNORE_PATTERNS)
    return repo_id


def publish_run(task: Task, config: RunConfig, distributed: Distributed, train_samples: int, eval_samples: int) -> None:
    """The end of a finished run on the main process: the model cards, then --push_to_hub's upload."""
    output_dir = Path(config.outputs.output_dir)
    model = describe_run(task, config, distributed, train_samples, eval_samples)
    for path in write_model_cards(model, output_dir, config.outputs.merge):
        logger.info("model card: %s", path)
    if config.outputs.push_to_hub:
        logger.info("pushed %s to https://huggingface.co/%s", output_dir,
                    push_to_hub(output_dir, config.outputs.hub_model_id))


def _hardware(distributed: Distributed) -> str:
    processes = f"{distributed.world_size} process{'es' if distributed.world_size > 1 else ''}"
    nodes = distributed.world_size // distributed.local_world_size
    where = f" on {nodes} nodes" if nodes > 1 else ""
    if distributed.device.type == "cuda":
        return f"{processes}{where}, one {torch.cuda.get_device_name(distributed.device)} each"
    return f"{processes}{where}, CPU"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _figures(report_path: Path) -> dict[str, float]:
    """The numbers of an eval_*.json report (its headline metric first); {} when it was not written."""
    report = _read_json(report_path) or {}
    return {key: value for key, value in report.items() if isinstance(value, (int, float))}
