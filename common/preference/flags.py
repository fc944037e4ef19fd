"""The flags of finetune_hf_trainer_dpo.py and their rules: read before any library loads (CONTRIBUTING.md,
Commands), so this module imports none."""

from __future__ import annotations

import argparse

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # common/preference/loss.py: pair_losses


def add_preference_flags(parser: argparse.ArgumentParser) -> None:
    dpo = parser.add_argument_group("preference tuning")
    dpo.add_argument("--beta", type=float, default=0.1,
                     help="strength of the pull towards the reference (DPO's beta; IPO's tau)")
    dpo.add_argument("--loss_type", choices=LOSS_TYPES, default="sigmoid",
                     help="sigmoid (DPO), ipo, hinge (SLiC) or robust (rDPO)")
    dpo.add_argument("--label_smoothing", type=float, default=0.0,
                     help="assumed share of pairs whose preference is flipped (sigmoid: cDPO, robust), in [0, 0.5)")
    dpo.add_argument("--rpo_alpha", type=float, default=None,
                     help="add this weight times the chosen answer's token loss (RPO); off by default")
    dpo.add_argument("--precompute_ref_log_probs", action="store_true",
                     help="compute the reference log-probabilities once before training and keep no reference "
                          "model (stored with the run: a resumed run reads them back)")
    dpo.add_argument("--max_prompt_length", type=int, default=None,
                     help="keep only the last N tokens of a longer prompt (a cut inside an image is refused)")


def flag_problems(args) -> list[str]:
    """The rules of finetune_hf_trainer_dpo.py's own flags, listed with the shared ones."""
    problems = []
    if args.beta <= 0:
        problems.append(f"--beta must be positive, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        problems.append(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    elif args.label_smoothing and args.loss_type not in ("sigmoid", "robust"):
        problems.append(f"--label_smoothing applies to --loss_type sigmoid and robust, not {args.loss_type}")
    if args.rpo_alpha is not None and args.rpo_alpha < 0:
        problems.append(f"--rpo_alpha must be >= 0, got {args.rpo_alpha}")
    if args.max_prompt_length is not None and args.max_prompt_length < 1:
        problems.append(f"--max_prompt_length must be positive, got {args.max_prompt_length}")
    if args.metric is not None:
        problems.append("--metric does not apply: preference runs are scored by rewards/accuracies")
    return problems
