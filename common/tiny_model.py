"""Write a tiny random Phi-3-V checkpoint folder, offline, in seconds: for tests, the demo and smoke runs.

The folder has the official layout (config.json, model.safetensors, generation_config.json, tokenizer
with the Phi-3 chat template and special tokens, preprocessor_config.json), so every script accepts it
as `--model_name_or_path`. The tokenizer is byte-level BPE (any text encodes) and adds BOS to every
encoding like the real one; the vision tower is a 2-layer CLIP at 336 px / patch 14, so image token
counts equal the real model's.

    python -m common.tiny_model /tmp/tiny_phi3v [--seed 0] [--num_crops 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from .logging_setup import quiet_libraries
from .phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\n' -}}{% endif %}"
)
# Merges are learnt from the kind of text the recipe's tasks use, so prompts stay short.
TRAINING_TEXT = [
    "Classify the video into one of the following classes: ApplyEyeMakeup, ApplyLipstick, Archery, "
    "BabyCrawling, BalanceBeam, BandMarching, BaseballPitch, Basketball, BasketballDunk, BenchPress.",
    "Is this meme hateful? Answer yes or no. The meme says: yes no",
    "The left image contains exactly two dogs. True or False? True False",
    "What is the total amount on this invoice? What is the date? The answer is 42.50 dollars.",
    "red green blue yellow white black square circle triangle shape colour color",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024 Answer the question with a short phrase.",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the Phi-3 special tokens at ids 0-7 and BOS prepended to every encoding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 2,
                original_max_position_embeddings: int = 4096) -> Phi3VConfig:
    """The official architecture scaled down: Phi-3 decoder, su rope, HD embedding, 2-layer CLIP-336/14.
    A small `original_max_position_embeddings` puts short samples on both sides of the su rope switch."""
    num_heads = 4
    rotary_pairs = hidden_size // num_heads // 2
    vision_hidden = 32
    return Phi3VConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=131072,
        original_max_position_embeddings=original_max_position_embeddings,
        rope_scaling={
            "type": "su",
            "short_factor": [1.0 + 0.05 * i for i in range(rotary_pairs)],
            "long_factor": [1.0 + 2.0 * i for i in range(rotary_pairs)],
        },
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
        img_processor={"image_dim_out": vision_hidden, "num_img_tokens": 144},
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": vision_hidden * 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 336,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
            "projection_dim": 32,
        },
        architectures=["Phi3VForCausalLM"],
    )


def write_tiny_phi3v(out_dir: str | Path, seed: int = 0, num_crops: int = 4, vocab_size: int = 512,
                     original_max_position_embeddings: int = 4096) -> Path:
    """Write a random tiny Phi-3-V checkpoint folder and return its path."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    config = tiny_config(len(tokenizer), original_max_position_embeddings=original_max_position_embeddings)
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|end|>"), config.eos_token_id],
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out_dir)
    processor = Phi3VProcessor(image_processor=Phi3VImageProcessor(num_crops=num_crops), tokenizer=tokenizer)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--num_crops", type=int, default=4, help="num_crops saved in preprocessor_config.json")
    args = parser.parse_args(argv)
    quiet_libraries(verbose=False)  # a command's output is its own lines (DeepSpeed's probe, the saving bar)
    print(f"Wrote a tiny Phi-3-V to {write_tiny_phi3v(args.out_dir, args.seed, args.num_crops)}")


if __name__ == "__main__":
    main()
