"""common/arguments.py: the shared flags, their recipe defaults, and what resolve_run_config makes of them."""

from dataclasses import FrozenInstanceError, dataclass

import pytest

from common.arguments import DEFAULT_DEEPSPEED_CONFIG, build_parser, check_flags, resolve_run_config
from common.config import RESUME_LATEST
from common.distributed import ONE_PROCESS, Distributed
from common.errors import UsageError
from common.metrics import ACCURACY
from common.strategy import TrainingStrategy
from common.task import Task


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """Tests run as one process unless they say otherwise (a torchrun environment must not leak in)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def parse(*argv, **defaults):
    return build_parser("test", **defaults).parse_args(list(argv))


def validated(*argv, **defaults):
    return resolve_run_config(parse(*argv, **defaults))


def problems_of(*argv, **defaults) -> str:
    with pytest.raises(UsageError) as info:
        validated(*argv, **defaults)
    assert info.value.exit_status == 2
    message = str(info.value)
    assert message.startswith("invalid arguments:")
    return message


# ---- defaults -----------------------------------------------------------------------------------------


def test_defaults_are_the_recipes():
    args = parse()
    assert args.model_name_or_path == "microsoft/Phi-3.5-vision-instruct"
    assert args.batch_size == 16
    assert args.batch_size_per_gpu == 1
    assert args.num_crops == 16
    assert args.learning_rate == pytest.approx(4e-5)
    assert args.wd == pytest.approx(0.01)
    assert args.lora_rank == 64
    assert args.lora_alpha_ratio == 2
    assert args.lora_dropout == 0
    assert args.num_train_epochs == 1
    assert args.warmup_steps == 50
    assert args.output_dir == "./output/"
    # Strategy flags are all off: the default run is full finetuning with sdpa and fp16 mixed precision.
    for flag in ("use_lora", "use_qlora", "bf16", "use_flash_attention", "freeze_vision_model", "merge"):
        assert getattr(args, flag) is False, flag
    assert args.tqdm is True
    assert args.resume_from_checkpoint is None
    assert args.deepspeed is None
    assert args.dataset_path is None and args.data_dir is None


def test_keyword_defaults_override_the_shared_ones():
    args = parse(num_crops=4)
    assert args.num_crops == 4
    assert args.batch_size == 16  # the rest untouched
    assert parse("--num_crops", "8", num_crops=4).num_crops == 8  # the command line still wins


def test_typed_flags_are_parsed():
    args = parse("--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha_ratio", "0.5", "--max_length", "2048")
    assert args.learning_rate == pytest.approx(1e-4)
    assert args.lora_rank == 8
    assert args.lora_alpha_ratio == pytest.approx(0.5)
    assert args.max_length == 2048


def test_no_tqdm_disables_progress_bars():
    assert parse("--no-tqdm").tqdm is False


def test_qlora_implies_lora_in_the_resolved_strategy():
    args = parse("--use_qlora")
    assert args.use_lora is False  # the flags stay as given
    assert resolve_run_config(args).strategy == TrainingStrategy(lora=True, quantize_4bit=True, freeze_vision=False)


def test_flags_resolve_into_their_pieces(tmp_path):
    config = validated("--use_lora", "--lora_rank", "8", "--wd", "0.1", "--output_dir", str(tmp_path),
                       "--max_length", "512", "--no-tqdm", "--skip_eval_before", "--max_new_tokens", "7")
    assert config.strategy.name == "LoRA" and config.lora.rank == 8 and config.lora.alpha_ratio == 2
    assert config.training.weight_decay == pytest.approx(0.1) and config.training.max_length == 512
    assert config.training.deepspeed_config is None  # adapters train under DDP
    assert config.outputs.output_dir == str(tmp_path)
    assert config.evaluation.max_new_tokens == 7 and config.evaluation.skip_before
    assert not config.training.show_progress and not config.evaluation.show_progress
    assert config.model.name_or_path == "microsoft/Phi-3.5-vision-instruct" and config.model.num_crops == 16
    assert config.task_options is None


def test_full_finetuning_defaults_to_the_zero2_config():
    assert validated().training.deepspeed_config == str(DEFAULT_DEEPSPEED_CONFIG)


def test_the_configuration_is_frozen():
    config = validated()
    with pytest.raises(FrozenInstanceError):
        config.training.batch_size = 4  # type: ignore[misc]


def test_task_options_are_typed():
    @dataclass(frozen=True)
    class Options:
        full_train: bool

    parser = build_parser("test")
    parser.add_argument("--full_train", action="store_true")
    task = Task("test", ACCURACY, options=Options)
    assert resolve_run_config(parser.parse_args(["--full_train"]), task).task_options == Options(full_train=True)


def test_resume_without_path_means_latest():
    assert validated("--resume_from_checkpoint").outputs.resume_from_checkpoint == RESUME_LATEST


def test_resume_with_existing_folder(tmp_path):
    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    resume = validated("--resume_from_checkpoint", str(checkpoint)).outputs.resume_from_checkpoint
    assert resume == str(checkpoint)


def test_resume_with_missing_folder_is_rejected(tmp_path):
    missing = tmp_path / "checkpoint-99"
    message = problems_of("--resume_from_checkpoint", str(missing))
    assert f"--resume_from_checkpoint {missing} is not a folder" in message


def test_resume_flag_before_another_flag_takes_no_value():
    config = validated("--resume_from_checkpoint", "--use_lora")
    assert config.outputs.resume_from_checkpoint == RESUME_LATEST
    assert config.strategy.lora is True


def test_eval_batch_size_defaults_to_batch_size_per_gpu():
    assert validated("--batch_size_per_gpu", "2").evaluation.batch_size == 2
    assert validated("--batch_size_per_gpu", "2", "--eval_batch_size", "8").evaluation.batch_size == 8


# ---- validation ---------------------------------------------------------------------------------------


def test_valid_defaults_pass_unchanged():
    config = validated()
    assert config.training.batch_size == 16 and config.strategy.lora is False


def test_all_problems_are_listed_in_one_exit(tmp_path):
    missing = tmp_path / "no_such_data"
    message = problems_of(
        "--num_crops", "17", "--batch_size", "3", "--batch_size_per_gpu", "2", "--data_dir", str(missing)
    )
    assert "--num_crops must be between 1 and 16, got 17" in message
    assert "--batch_size 3 must be divisible by processes (1) x --batch_size_per_gpu (2)" in message
    assert f"--data_dir {missing} does not exist" in message
    assert len(message.splitlines()) == 4  # header + exactly the three problems


def test_check_flags_lists_the_problems_that_need_no_library(tmp_path, monkeypatch):
    """The check before the libraries load: the same messages, all at once; the batch size against the launched
    processes waits for resolve_run_config (it needs the launcher's world, which common/distributed.py reads)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    missing = tmp_path / "no_such_data"
    with pytest.raises(UsageError) as info:
        check_flags(parse("--num_crops", "17", "--batch_size", "6", "--data_dir", str(missing), "--merge"))
    assert info.value.exit_status == 2
    assert str(info.value).splitlines() == [
        "invalid arguments:",
        "  --num_crops must be between 1 and 16, got 17",
        "  --merge only applies to LoRA/QLoRA runs (full finetuning already saves a full model)",
        f"  --data_dir {missing} does not exist",
    ]
    check_flags(parse("--batch_size", "6"))  # 6 / 4 processes: resolve_run_config's to refuse
    assert "--batch_size 6 must be divisible by processes (4)" in problems_of("--batch_size", "6")


@pytest.mark.parametrize("crops", [0, 17])
def test_num_crops_out_of_range(crops):
    assert f"--num_crops must be between 1 and 16, got {crops}" in problems_of("--num_crops", str(crops))


@pytest.mark.parametrize("crops", [1, 16])
def test_num_crops_bounds_are_valid(crops):
    assert validated("--num_crops", str(crops)).model.num_crops == crops


@pytest.mark.parametrize(
    "flag", ["batch_size", "batch_size_per_gpu", "num_train_epochs", "lora_rank", "logging_steps", "eval_size"]
)
def test_counts_must_be_positive(flag):
    assert f"--{flag} must be at least 1, got 0" in problems_of(f"--{flag}", "0")


def test_batch_size_divisibility_uses_the_launched_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Distributed.launched().world_size == 4
    config = validated("--batch_size", "16", "--batch_size_per_gpu", "2")  # 16 / (4 x 2): accumulation 2
    assert config.training.batch_size == 16
    message = problems_of("--batch_size", "16", "--batch_size_per_gpu", "3")  # 16 / (4 x 3): not whole
    assert "--batch_size 16 must be divisible by processes (4) x --batch_size_per_gpu (3)" in message
    with pytest.raises(UsageError, match=r"processes \(2\)"):
        resolve_run_config(parse("--batch_size", "3"), distributed=processes(2))


def processes(world_size: int) -> Distributed:
    return Distributed(rank=0, local_rank=0, world_size=world_size, local_world_size=world_size, device=ONE_PROCESS.device)


def test_world_size_defaults_to_one():
    assert Distributed.launched().world_size == 1
    assert validated("--batch_size", "3", "--batch_size_per_gpu", "3").training.batch_size == 3


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--lora_dropout", "1.0"], "--lora_dropout must be in [0, 1), got 1.0"),
        (["--lora_dropout", "-0.1"], "--lora_dropout must be in [0, 1), got -0.1"),
        (["--lora_alpha_ratio", "0"], "--lora_alpha_ratio must be positive, got 0.0"),
        (["--learning_rate", "0"], "--learning_rate must be positive, got 0.0"),
        (["--save_steps", "-1"], "--save_steps must be >= 0, got -1"),
        (["--warmup_steps", "-1"], "--warmup_steps must be >= 0, got -1"),
        (["--save_total_limit", "0"], "--save_total_limit must be at least 1 (leave it out to keep every checkpoint)"),
        (["--save_total_limit", "-1"], "--save_total_limit must be at least 1"),
        (["--max_length", "0"], "--max_length must be positive, got 0"),
        (["--max_eval_samples", "0"], "--max_eval_samples must be positive, got 0"),
    ],
)
def test_out_of_range_values(argv, expected):
    assert expected in problems_of(*argv)


def test_merge_without_lora_is_rejected():
    assert "--merge only applies to LoRA/QLoRA runs" in problems_of("--merge")
    assert validated("--merge", "--use_lora").outputs.merge is True
    assert validated("--merge", "--use_qlora").outputs.merge is True  # QLoRA implies LoRA for the check


def test_push_to_hub_needs_the_hub_and_a_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    assert validated().outputs.push_to_hub is False
    assert "--hub_model_id only applies with --push_to_hub" in problems_of("--hub_model_id", "me/model")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = problems_of("--push_to_hub")
    assert "--push_to_hub needs the hub, but HF_HUB_OFFLINE is set" in message
    assert "--push_to_hub needs a Hugging Face token" in message
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    outputs = validated("--push_to_hub", "--hub_model_id", "me/model").outputs
    assert (outputs.push_to_hub, outputs.hub_model_id) == (True, "me/model")


def test_deepspeed_with_lora_is_rejected(tmp_path):
    config = tmp_path / "zero2.json"
    config.write_text("{}")
    assert "--deepspeed is for full finetuning" in problems_of("--deepspeed", str(config), "--use_lora")
    assert "--deepspeed is for full finetuning" in problems_of("--deepspeed", str(config), "--use_qlora")
    assert validated("--deepspeed", str(config)).training.deepspeed_config == str(config)


def test_missing_deepspeed_config_is_rejected(tmp_path):
    missing = tmp_path / "nope.json"
    assert f"--deepspeed {missing} does not exist" in problems_of("--deepspeed", str(missing))


def test_zero3_config_is_refused_up_front_with_the_reason(tmp_path):
    config = tmp_path / "zero3.json"
    config.write_text('{"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}')
    message = problems_of("--deepspeed", str(config))
    assert f"--deepspeed {config} asks for ZeRO stage 3" in message
    assert "synced generation" in message and "ZeRO-2" in message


def test_shipped_zero2_config_is_accepted():
    from common.arguments import DEFAULT_DEEPSPEED_CONFIG

    config = validated("--deepspeed", str(DEFAULT_DEEPSPEED_CONFIG))
    assert config.training.deepspeed_config == str(DEFAULT_DEEPSPEED_CONFIG)


def test_unreadable_deepspeed_config_is_rejected(tmp_path):
    config = tmp_path / "broken.json"
    config.write_text('{"zero_optimization": ')
    assert f"--deepspeed {config} is not a readable JSON file" in problems_of("--deepspeed", str(config))


def test_dataset_path_and_data_dir_are_exclusive(tmp_path):
    message = problems_of("--dataset_path", str(tmp_path), "--data_dir", str(tmp_path))
    assert "give one data source, not --dataset_path and --data_dir" in message
    assert "does not exist" not in message  # both exist: only the one problem
    assert validated("--dataset_path", str(tmp_path)).data.dataset_path == str(tmp_path)
    assert validated("--data_dir", str(tmp_path)).data.data_dir == str(tmp_path)


def test_conversation_files_and_their_images(tmp_path):
    train, evaluation = tmp_path / "train.json", tmp_path / "eval.jsonl"
    train.write_text("[]")
    evaluation.write_text("")
    config = validated("--train_file", str(train), "--eval_file", str(evaluation), "--image_folder", str(tmp_path),
                       "--metric", "anls")
    assert (config.data.train_file, config.data.eval_file, config.data.image_folder) == (
        str(train), str(evaluation), str(tmp_path))
    assert config.evaluation.metric == "anls" and validated().evaluation.metric is None
    assert validated("--data_dir", str(tmp_path), "--image_folder", str(tmp_path)).data.image_folder == str(tmp_path)


@pytest.mark.parametrize("argv, expected", [
    (["--train_file", "{train}", "--data_dir", "{dir}"], "give one data source, not --data_dir and --train_file"),
    (["--eval_file", "{train}"], "--eval_file needs --train_file"),
    (["--image_folder", "{dir}"], "--image_folder applies to custom data"),
    (["--train_file", "{dir}"], "--train_file {dir} is not a file"),
    (["--train_file", "{train}", "--eval_file", "{dir}/nope.json"], "--eval_file {dir}/nope.json is not a file"),
    (["--data_dir", "{dir}", "--image_folder", "{train}"], "--image_folder {train} is not a folder"),
])
def test_conversation_flag_problems(tmp_path, argv, expected):
    train = tmp_path / "train.json"
    train.write_text("[]")
    values = {"train": str(train), "dir": str(tmp_path)}
    assert expected.format(**values) in problems_of(*(arg.format(**values) for arg in argv))


def test_metric_choices():
    with pytest.raises(SystemExit):
        parse("--metric", "bleu")


def test_missing_dataset_path_is_rejected(tmp_path):
    missing = tmp_path / "docvqa"
    assert f"--dataset_path {missing} does not exist" in problems_of("--dataset_path", str(missing))


@pytest.mark.parametrize("flag", ["eval_batch_size", "max_new_tokens"])
def test_generation_counts_must_be_positive(flag):
    assert f"--{flag}" in problems_of(f"--{flag}", "0")


def test_output_dir_that_is_a_file_is_rejected(tmp_path):
    file = tmp_path / "out.txt"
    file.write_text("")
    assert f"--output_dir {file} is a file, not a folder" in problems_of("--output_dir", str(file))


@pytest.mark.parametrize("path", ["./tiny_modle", "/no/such/model", "models/../x", "not a hub id"])
def test_mistyped_model_folder_is_rejected(path):
    assert f"--model_name_or_path {path} is not a folder (check the path) nor a hub model id" in problems_of(
        "--model_name_or_path", path
    )


def test_model_folder_without_config_is_rejected(tmp_path):
    assert "is a folder without config.json" in problems_of("--model_name_or_path", str(tmp_path))


@pytest.mark.parametrize("hub_id", ["microsoft/Phi-3.5-vision-instruct", "gpt2"])
def test_hub_ids_pass(hub_id):
    assert validated("--model_name_or_path", hub_id).model.name_or_path == hub_id


def test_help_documents_the_precision_flags():
    import predict

    for parser in (build_parser("test"), predict.build_parser()):
        text = " ".join(parser.format_help().split())
        assert "--fp16 fp16 mixed precision with loss scaling" in text
        assert "--dtype {auto,float32,bfloat16,float16} dtype the weights load in" in text
        assert "--bf16 bf16 autocast" in text


def test_dtype_is_one_of_the_hugging_face_names(capsys):
    assert parse().dtype == "auto" and not parse().fp16
    assert parse("--dtype", "bfloat16", "--fp16").dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parse("--dtype", "bf16")
    assert "invalid choice: 'bf16'" in capsys.readouterr().err


def test_precision_problems_are_listed_with_the_others(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    message = problems_of("--bf16", "--fp16", "--num_crops", "0")
    assert "--bf16 and --fp16 exclude each other" in message and "--num_crops" in message
    assert "--dtype float16 does not go with --bf16" in problems_of("--bf16", "--dtype", "float16")


def test_flash_attention_problems_are_listed_with_the_others(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    message = problems_of("--use_flash_attention", "--bf16", "--num_crops", "0")
    assert "--use_flash_attention needs a CUDA GPU" in message and "--num_crops" in message


# ---- evaluation during training -----------------------------------------------------------------------


def test_evaluation_during_training_is_off_by_default():
    during = validated().during_training
    assert not during.enabled and not during.keep_best and during.early_stopping_patience is None


def test_evaluation_during_training_flags_resolve():
    during = validated("--eval_steps", "50", "--eval_every_epoch", "--eval_during_training_samples", "64",
                       "--keep_best", "--early_stopping_patience", "3").during_training
    assert (during.eval_steps, during.every_epoch, during.samples, during.keep_best, during.early_stopping_patience) \
        == (50, True, 64, True, 3)
    assert during.enabled


@pytest.mark.parametrize("flag", [["--keep_best"], ["--early_stopping_patience", "2"],
                                  ["--eval_during_training_samples", "8"]])
def test_what_needs_evaluations_during_training_says_so(flag):
    assert f"{flag[0]} needs evaluations during training: add --eval_steps N or --eval_every_epoch" in \
        problems_of(*flag)


@pytest.mark.parametrize("argv, expected", [
    (["--eval_steps", "-1"], "--eval_steps must be >= 0, got -1"),
    (["--eval_steps", "5", "--eval_during_training_samples", "0"], "--eval_during_training_samples must be at least 1"),
    (["--eval_every_epoch", "--early_stopping_patience", "0"], "--early_stopping_patience must be at least 1, got 0"),
])
def test_evaluation_during_training_values_are_checked(argv, expected):
    assert expected in problems_of(*argv)


def test_packing_and_gradient_checkpointing():
    training = validated().training
    assert (training.packing, training.gradient_checkpointing) == (False, True)  # the recipe's: padded, recomputed
    training = validated("--packing", "--gradient_checkpointing", "off").training
    assert training.packing and training.max_packed_tokens is None and not training.gradient_checkpointing
    assert validated("--packing", "--max_packed_tokens", "4096").training.max_packed_tokens == 4096
    message = problems_of("--max_packed_tokens", "0")
    assert "--max_packed_tokens only applies with --packing" in message
    assert "--max_packed_tokens must be positive, got 0" in message
