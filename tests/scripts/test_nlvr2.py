"""finetune_hf_trainer_nlvr2.py end to end with every strategy, on the_cauldron schema with two images per
row (save_to_disk folder and parquet file), plus --merge: a standalone model equal to base + adapter, with its
own model card."""

import pytest
import torch

from tests.scripts.e2e import (
    assert_finished_run,
    assert_model_card,
    colour_image,
    read_eval,
    run_cauldron_task,
)

DATA_FORMAT = {"full": "parquet", "frozen": "disk", "lora": "disk", "qlora": "parquet"}
NUM_ROWS, EVAL_SIZE = 6, 2


@pytest.fixture(scope="module")
def runs(launcher, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("nlvr2")
    merge = {"lora": ["--merge"]}
    return root, run_cauldron_task(launcher, tiny_model_dir, root, "nlvr2", NUM_ROWS, EVAL_SIZE, DATA_FORMAT, merge)


@pytest.mark.parametrize("strategy", DATA_FORMAT)
def test_trains_saves_reloads_and_evaluates(runs, strategy, tiny_model_dir):
    root, results = runs
    assert_finished_run(results[strategy], root / strategy, strategy, tiny_model_dir, num_eval=EVAL_SIZE)
    report = read_eval(root / strategy, "after")
    assert report["answers_unique"] == ["true", "true"]  # the first pair of each held-out row, normalised


def test_merge_writes_a_standalone_model_equal_to_base_plus_adapter(runs, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoProcessor

    root, results = runs
    results["lora"].check()
    merged_dir = root / "lora" / "merged"
    merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in name for name, _ in merged.named_parameters())
    card = assert_model_card(merged_dir, "transformers", tiny_model_dir, root / "lora")  # kept current by --merge
    assert "merged" in card.data.tags and f"vllm serve {root / 'lora' / 'merged'}" in card.text
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), root / "lora")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    processor = AutoProcessor.from_pretrained(merged_dir)
    prompt = "<|user|>\n<|image_1|><|image_2|>\nThe left image is red. True or False?<|end|>\n<|assistant|>\n"
    inputs = processor(prompt, [colour_image("red"), colour_image("blue", (24, 32))], return_tensors="pt")
    with torch.no_grad():
        merged_logits, adapted_logits, base_logits = (model.eval()(**inputs).logits for model in (merged, adapted, base))
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-5), (merged_logits - adapted_logits).abs().max()
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # the adapter does change the model
