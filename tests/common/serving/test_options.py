"""The --serve flags of predict.py: checked in one pass with the others, the API key from the flag or
$PHI3V_API_KEY, a --compare that holds no model named as --compare."""

from __future__ import annotations

import pytest

from common.errors import UserError
from common.serving.options import API_KEY_VARIABLE, serving_config
from tests.scripts.e2e import REPO_ROOT, load_module

predict = load_module(REPO_ROOT / "predict.py", "predict_for_serving_options")


def problems(*argv: str) -> list[str]:
    return predict.usage_problems(predict.build_parser().parse_args(["--model", "m", *argv]))


def test_serve_needs_no_question_and_takes_none():
    assert problems("--serve") == []
    assert problems("--serve", "--prompt", "What?", "--image", "a.png") == [
        "--serve answers over HTTP: leave out --prompt, --image, --data_file and --output"]


def test_serving_flags_are_checked_together(tmp_path):
    found = problems("--serve", "--port", "0", "--allowed_local_media_path", str(tmp_path / "gone"),
                     "--compare", "m", "--max_model_len", "1", "--max_images", "-1", "--max_request_mb", "0")
    assert found == [
        "--port must be between 1 and 65535, got 0",
        f"--allowed_local_media_path {tmp_path / 'gone'}: no such folder",
        "--compare names the same model as --model",
        "--max_model_len must be at least 2, got 1",
        "--max_images must be at least 0, got -1",
        "--max_request_mb must be above 0, got 0.0",
    ]
    assert problems("--prompt", "What?", "--api_key", "k", "--compare", "base") == ["only with --serve: --api_key, --compare"]


def test_the_key_comes_from_the_flag_or_the_environment(monkeypatch, tiny_model_dir, tmp_path):
    def config(*argv):
        return serving_config(predict.build_parser().parse_args(["--model", "m", "--serve", *argv]))

    monkeypatch.delenv(API_KEY_VARIABLE, raising=False)
    assert config().api_key is None
    monkeypatch.setenv(API_KEY_VARIABLE, "from-env")
    assert config().api_key == "from-env"
    assert config("--api_key", "from-flag").api_key == "from-flag"
    served = config("--compare", str(tiny_model_dir), "--allowed_local_media_path", str(tmp_path), "--max_request_mb", "2")
    assert (served.compare.weights, served.compare_name) == (str(tiny_model_dir), str(tiny_model_dir))
    assert served.allowed_local_media_path == tmp_path.resolve() and served.max_request_bytes == 2 * 2**20
    with pytest.raises(UserError, match=f"^--compare {tmp_path / 'gone'}: no such folder"):
        config("--compare", str(tmp_path / "gone"))
