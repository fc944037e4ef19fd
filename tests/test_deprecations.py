"""Deprecated library APIs stay out of our code: pyproject's filterwarnings turn a DeprecationWarning or
FutureWarning attributed to our modules (their caller) into an error in every test; library-internal ones
stay warnings."""

import warnings

import pytest


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
@pytest.mark.parametrize(
    "module", ["common.phi3v.modeling_phi3_v", "common.finetune", "benchmarks.worker", "finetune_hf_trainer_nlvr2"]
)
def test_deprecation_warnings_from_our_modules_are_errors(category, module):
    with pytest.raises(category):
        warnings.warn_explicit("`past_key_values` is deprecated", category, "x.py", 1, module=module)


@pytest.mark.parametrize("module", ["transformers.modeling_utils", "commonmark", "torch.amp"])
def test_library_deprecations_stay_warnings(module):
    with pytest.warns(FutureWarning):
        warnings.warn_explicit("deprecated", FutureWarning, "x.py", 1, module=module)
