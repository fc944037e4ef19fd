"""The model card of a finished run (common/model_card.py): the facts gathered from its configuration and the
files it wrote, the card huggingface_hub reads back, and what --push_to_hub uploads. Real runs' cards are checked
end to end in tests/scripts (e2e.py: assert_model_card)."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from common.arguments import build_parser, resolve_run_config
from common.distributed import ONE_PROCESS
from common.metrics import ANLS
from common.model_card import (
    PIPELINE_TAG,
    RECIPE_URL,
    base_model_id,
    describe_run,
    model_card,
    push_to_hub,
    write_model_cards,
)
from common.task import Task

TASK = Task("DocVQA", ANLS, hub_datasets=lambda options: ("nielsr/docvqa_1200_examples",))


def finished_output(output_dir: Path, adapter: bool, best_step: int | None = None) -> Path:
    """The files a finished run leaves that the card reads."""
    output_dir.mkdir(parents=True)
    (output_dir / "eval_before.json").write_text(json.dumps(
        {"answers_unique": [["a"]] * 4, "generated_texts_unique": ["b"] * 4, "anls": 0.25, "anls_case_insensitive": 0.3}))
    (output_dir / "eval_after.json").write_text(json.dumps(
        {"answers_unique": [["a"]] * 4, "generated_texts_unique": ["a"] * 4, "anls": 0.75, "anls_case_insensitive": 0.8}))
    state = {"global_step": 12, "max_steps": 12, "log_history": [{"loss": 2.0, "step": 10}, {"train_loss": 1.5, "step": 12}],
             "best_metric": 0.7 if best_step else None, "best_global_step": best_step}
    (output_dir / "trainer_state.json").write_text(json.dumps(state))
    if adapter:
        (output_dir / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}))
    return output_dir


def described(output_dir: Path, model: str, *flags: str):
    args = build_parser("test").parse_args(["--model_name_or_path", model, "--output_dir", str(output_dir), *flags])
    return describe_run(TASK, resolve_run_config(args, TASK, ONE_PROCESS), ONE_PROCESS, train_samples=40, eval_samples=4)


def load(card: ModelCard, tmp_path: Path) -> ModelCard:
    path = tmp_path / "card" / "README.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(str(card))
    return ModelCard.load(path)


def test_an_adapters_card_and_its_merged_models_card(tmp_path):
    output_dir = finished_output(tmp_path / "memes-lora", adapter=True, best_step=8)
    model = described(output_dir, "microsoft/Phi-3.5-vision-instruct", "--use_lora", "--merge", "--keep_best",
                      "--eval_steps", "4", "--learning_rate", "2e-4")
    adapter = load(model_card(model), tmp_path)
    assert adapter.data.base_model == "microsoft/Phi-3.5-vision-instruct"
    assert (adapter.data.library_name, adapter.data.pipeline_tag) == ("peft", PIPELINE_TAG)
    assert {"phi3_v", "docvqa", "lora"} <= set(adapter.data.tags)
    assert adapter.data.datasets == ["nielsr/docvqa_1200_examples"]
    [result] = adapter.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("anls", 0.75, "nielsr/docvqa_1200_examples")
    text = adapter.text
    assert "A LoRA adapter for [microsoft/Phi-3.5-vision-instruct]" in text
    assert "| anls | 0.2500 | 0.7500 |" in text and "| anls_case_insensitive | 0.3000 | 0.8000 |" in text
    assert "Best anls during training: 0.7000 at step 8; the final model is that step's" in text
    assert "| `--learning_rate` | 0.0002 |" in text and "| optimizer steps | 12 of 12 |" in text
    assert "| LoRA | rank 8, alpha 16, dropout 0.05 |" in text and "| hardware | 1 process, CPU |" in text
    assert "| training samples | 40 |" in text and "| evaluation samples | 4 |" in text
    assert f"predict.py --model {output_dir} --base_model microsoft/Phi-3.5-vision-instruct" in text
    assert "PeftModel.from_pretrained(base" in text and RECIPE_URL in text

    merged = load(model_card(model, merged=True), tmp_path)
    assert (merged.data.library_name, merged.data.base_model) == ("transformers", "microsoft/Phi-3.5-vision-instruct")
    assert "merged" in merged.data.tags and merged.data.eval_results[0].metric_value == 0.75
    assert f"vllm serve {output_dir}/merged" in merged.text
    assert 'hf download microsoft/Phi-3.5-vision-instruct --include "*.py"' in merged.text


def test_a_full_finetuning_card_on_local_data(tmp_path):
    data_dir = tmp_path / "conversations"
    data_dir.mkdir()
    base = tmp_path / "models" / "Phi-3.5-vision-instruct"  # an offline copy of the official checkpoint
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    output_dir = finished_output(tmp_path / "out", adapter=False)
    (output_dir / "eval_before.json").unlink()
    model = described(output_dir, str(base), "--data_dir", str(data_dir), "--skip_eval_before",
                      "--hub_model_id", "me/docs", "--push_to_hub")
    card = load(model_card(model), tmp_path)
    assert (card.data.library_name, card.data.base_model) == ("transformers", "microsoft/Phi-3.5-vision-instruct")
    assert card.data.datasets is None  # local data: no hub dataset to name
    assert card.data.eval_results[0].dataset_type == "custom"
    assert card.text.lstrip().startswith("# me/docs")  # the repository --push_to_hub pushes to
    assert "From the hub, use `me/docs` in place of the folder" in card.text
    assert f"| data | `{data_dir}` (local) |" in card.text
    assert "| anls | not evaluated | 0.7500 |" in card.text
    assert "(full finetuning)" in card.text and "Best" not in card.text
    assert "vllm serve" in card.text


@pytest.fixture(autouse=True)
def _hub_reachable(monkeypatch):
    """--push_to_hub's checks (a token, the hub not offline) pass; nothing here contacts the hub."""
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def test_base_model_ids(tmp_path):
    assert base_model_id("microsoft/Phi-3-vision-128k-instruct") == "microsoft/Phi-3-vision-128k-instruct"
    official = tmp_path / "Phi-3-vision-128k-instruct"
    own = tmp_path / "my-model"
    official.mkdir(), own.mkdir()
    assert base_model_id(str(official)) == "microsoft/Phi-3-vision-128k-instruct"
    assert base_model_id(str(own)) == str(own)  # unknown on the hub: named by its path, as PEFT names it


def test_the_cards_replace_any_readme_and_are_what_push_to_hub_uploads(tmp_path):
    output_dir = finished_output(tmp_path / "run", adapter=True)
    (output_dir / "README.md").write_text("---\nlibrary_name: peft\n---\nPEFT's template\n")
    (output_dir / "merged").mkdir()
    model = described(output_dir, "microsoft/Phi-3.5-vision-instruct", "--use_qlora", "--merge")
    assert write_model_cards(model, output_dir, merged=True) == [output_dir / "README.md",
                                                                  output_dir / "merged" / "README.md"]
    assert not list(output_dir.rglob("*.tmp"))
    assert "PEFT's template" not in (output_dir / "README.md").read_text()

    class FakeHub:
        """Records what would be created and uploaded, and what the card in the folder is at upload time."""

        def create_repo(self, name, exist_ok):
            self.created = (name, exist_ok)
            return type("RepoUrl", (), {"repo_id": f"me/{name}"})()

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            self.uploaded = (repo_id, Path(folder_path), ignore_patterns)
            self.card = ModelCard.load(Path(folder_path) / "README.md")

    hub = FakeHub()
    assert push_to_hub(output_dir, None, api=hub) == "me/run"
    assert hub.created == ("run", True)  # the Trainer's default repository: the output folder's name
    assert hub.uploaded == ("me/run", output_dir, ["_*", "checkpoint-*"])
    assert hub.card.data.library_name == "peft" and hub.card.data.eval_results[0].metric_value == 0.75
    assert "qlora" in hub.card.data.tags and "A QLoRA adapter for" in hub.card.text
