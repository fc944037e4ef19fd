"""common/cli.py and common/errors.py: a user error becomes one line and an exit status, anything else keeps
its traceback."""

import pytest
from torch.utils.data import DataLoader, Dataset

from common.cli import main_guard, user_message
from common.errors import UsageError, UserError


def failing(error: BaseException):
    def run():
        raise error

    return run


@pytest.mark.parametrize("error, status", [(UserError("bad sample 3"), 1), (UsageError("--num_crops 17"), 2)])
def test_user_errors_become_one_line_and_a_status(error, status, capsys):
    with pytest.raises(SystemExit) as exit_:
        main_guard(failing(error))
    assert exit_.value.code == status
    assert capsys.readouterr().err == f"error: {error}\n"


def test_other_exceptions_keep_their_traceback():
    # e.g. the model's internal consistency checks: a bug, whose traceback the report needs
    with pytest.raises(ValueError, match="image_sizes has 2 rows"):
        main_guard(failing(ValueError("image_sizes has 2 rows but pixel_values hold 3 images")))


def test_the_result_is_returned():
    assert main_guard(lambda: {"after": 1.0}) == {"after": 1.0}


class BadSample(Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        raise UserError(f"sample {index}: cannot read image gone.png")


def test_an_error_in_a_data_loader_worker_keeps_its_type_and_message():
    with pytest.raises(UserError) as raised:
        next(iter(DataLoader(BadSample(), num_workers=1, multiprocessing_context="fork")))
    assert "Traceback" in str(raised.value)  # the worker's traceback, folded into the message by torch
    assert user_message(raised.value) == "sample 0: cannot read image gone.png"
    assert raised.value.exit_status == 1
