"""Distributed runs through the real scripts under torchrun (gloo on CPU): full finetuning with ZeRO-2 in two
processes, LoRA under DDP in two processes, and a two-node launch simulated on 127.0.0.1. Each writes its
evaluation reports once (rank 0) over every evaluation sample, gathered from both ranks."""

import pytest
import torch

from tests.scripts.e2e import (
    SCRIPTS,
    assert_finished_run,
    fast_args,
    finish,
    free_port,
    read_eval,
    tensors,
    torchrun,
    write_cauldron,
)

EVAL_SIZE = 3  # odd: the ranks' evaluation shards differ in size


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cauldron(tmp_path_factory.mktemp("distributed") / "memes", "hateful_memes", 7, "disk")


def args_for(model_dir, output_dir, data, *extra):
    # global batch 4 = 2 processes x 1 per device x 2 accumulation steps
    return fast_args(model_dir, output_dir, "--dataset_path", data, "--eval_size", str(EVAL_SIZE),
                     "--batch_size", "4", "--batch_size_per_gpu", "1", *extra)


def assert_gathered_once(result, output_dir, strategy, model_dir):
    assert_finished_run(result, output_dir, strategy, model_dir, num_eval=EVAL_SIZE)
    assert "on 2 process(es)" in result.stdout
    for when in ("before", "after"):
        assert read_eval(output_dir, when)["answers_unique"] == ["yes", "no", "no"]  # in dataset order
    assert not list(output_dir.glob("*.tmp"))


@pytest.mark.parametrize("strategy, flags", [("full", []), ("lora", ["--use_lora"])], ids=["full-zero2", "lora-ddp"])
def test_two_processes(strategy, flags, data, tiny_model_dir, tmp_path):
    output_dir = tmp_path / "out"
    process = torchrun(SCRIPTS["hateful_memes"], args_for(tiny_model_dir, output_dir, data, *flags),
                       "--nproc_per_node=2", f"--master_port={free_port()}", cwd=tmp_path)
    result = finish(process)
    assert_gathered_once(result, output_dir, strategy, tiny_model_dir)
    assert "unused parameters" not in result.stderr


def test_two_nodes_on_one_host(data, tiny_model_dir, tmp_path):
    output_dir = tmp_path / "out"
    args = args_for(tiny_model_dir, output_dir, data)
    port = free_port()
    nodes = [
        torchrun(SCRIPTS["hateful_memes"], args, "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                 "--master_addr=127.0.0.1", f"--master_port={port}", cwd=tmp_path)
        for rank in (0, 1)
    ]
    main_node, other_node = (finish(node) for node in nodes)
    other_node.check()
    assert_gathered_once(main_node, output_dir, "full", tiny_model_dir)
    assert "finetuning:" not in other_node.stdout  # reports come from global rank 0 only


def test_lora_in_two_processes_trains_as_one_process_with_the_same_global_batch(launcher, data, tiny_model_dir,
                                                                                  tmp_path):
    """DDP, not two ranks training alone: 2 processes x 1 sample x 2 accumulation steps see the samples one
    process sees with 4 accumulation steps, so the adapters end equal."""
    flags = ["--use_lora", "--skip_eval_before", "--max_eval_samples", "1"]
    two = tmp_path / "two"
    finish(torchrun(SCRIPTS["hateful_memes"], args_for(tiny_model_dir, two, data, *flags),
                    "--nproc_per_node=2", f"--master_port={free_port()}", cwd=tmp_path)).check()
    one = tmp_path / "one"
    launcher.run(SCRIPTS["hateful_memes"], args_for(tiny_model_dir, one, data, *flags)).check()
    two_processes, one_process = (tensors(out / "adapter_model.safetensors") for out in (two, one))
    assert two_processes.keys() == one_process.keys()
    for name, weight in one_process.items():
        torch.testing.assert_close(two_processes[name], weight, rtol=0, atol=1e-6, msg=name)
