"""Custom conversation data in three formats, each read into the same `Sample`s (common/data.py), so that a
conversation trains on the same tokens whichever format it is written in.

    sources.py       where the data comes from (--data_dir, --train_file/--eval_file, --dataset_path), what evaluates
    naming.py        which files or splits evaluate, by name
    files.py         one .json/.jsonl file: its format detected from its first record
    records.py       a file's JSON records with their line numbers
    generic.py       the recipe's generic jsonl format (convert_ucf101.py writes it)
    llava.py         LLaVA / ShareGPT JSON
    chat.py          chat messages (transformers / TRL)
    tables.py        chat-messages datasets: save_to_disk folders and parquet files
    conversation.py  what every format shares: roles in order, the placement of images, the Sample
    images.py        where relative image paths point
"""

from .files import read_conversation_file
from .sources import load_conversations

__all__ = ["load_conversations", "read_conversation_file"]
