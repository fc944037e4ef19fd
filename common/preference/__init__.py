"""Preference tuning (DPO): pairs of a better and a worse answer to the same conversation, and the objective
that learns from them, on the same run as supervised finetuning (common/finetune.py).

    pairs.py      a preference pair: the conversation up to its last question, and its two answers
    trl.py        TRL's preference records (prompt, chosen, rejected, images)
    sharegpt.py   LLaMA-Factory's sharegpt preference records (conversations, chosen, rejected, images)
    rlaif.py      RLAIF-V's flat rows (question, chosen, rejected, image)
    sources.py    where pairs come from (--train_file/--eval_file, --data_dir, --dataset_path), detected per file
    batches.py    a pair's two token sequences, and batches of pairs (padded or packed), images once per pair
    loss.py       sequence log-probabilities, the DPO losses and the reward metrics
    reference.py  the reference model: adapters disabled, a frozen copy, or log-probabilities computed beforehand
    trainer.py    the Trainer of a preference run
    objective.py  what a preference run does where a supervised one generates: evaluation, preview, Trainer
"""
