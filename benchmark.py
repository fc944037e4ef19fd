r"""Training throughput and peak GPU memory of Phi-3.5-vision finetuning, per strategy, with and without flash attention.

Each configuration (strategy x flash attention) runs in a fresh process through the scripts' own code path:
the shared flags (`common.arguments.build_parser`, so every script flag works here too), `TrainingStrategy`
/ `build_model`, `training_arguments` (Trainer, DeepSpeed ZeRO-2 for full and frozen-vision finetuning,
DDP for LoRA/QLoRA) and `Phi3VTrainCollator`, on DocVQA-like synthetic documents (a 1700x2200 page of
black text-like rectangles, a question, a short answer) at num_crops 16 (about 2540 tokens per sample; the
recipe's DocVQA average is 2443). The Trainer runs --warmup_steps untimed optimizer steps, then --steps
timed ones; a callback times the window between them (the only CUDA synchronisations it adds).

    # one GPU, the defaults: full, frozen, LoRA, QLoRA; flash attention where it runs; global batch 16,
    # 1 untimed + 3 timed optimizer steps (a few minutes per configuration at most)
    python benchmark.py --random_init
    # like the recipe's table: one node with 8 GPUs, global batch 64, with and without flash attention
    python benchmark.py --random_init --nproc_per_node 8 --batch_size 64 --steps 5 --flash both
    # CPU smoke test with the tiny model (the tests run this with --flash both: flash rows give their reason)
    OMP_NUM_THREADS=1 python benchmark.py --tiny --num_crops 1 --batch_size 1 --dataloader_num_workers 0 \
        --strategies full,lora --flash off --steps 2 --warmup_steps 1
    # padded vs packed micro-batches (tokens/s, padding, peak memory) on DocVQA pages and a mixed-length set
    python benchmark.py --random_init --batching --batch_size_per_gpu 4
    OMP_NUM_THREADS=2 python benchmark.py --tiny --batching --batch_size_per_gpu 4   # CPU, the tiny model
    # one configuration under your own launcher, then the report from all rows in --output_dir
    torchrun --nproc_per_node 8 benchmark.py --worker --random_init --strategies lora --flash on
    python benchmark.py --collect --random_init

--random_init writes a random bf16 checkpoint of the full-size model (benchmarks/phi35v_config.json, the official
config) once into --cache_dir and loads it through from_pretrained like a real one (QLoRA quantises on load);
--tiny uses common.tiny_model; otherwise --model_name_or_path is benchmarked. Throughput does not depend on
the weights' values.

Outputs (default into --output_dir): benchmark.md (a table like the recipe's plus device, versions and the data
path) and benchmark.json (the same rows), rows/<config>.json per configuration and logs/<config>.log.

Metrics. Throughput = images per optimizer step (global batch size, one image per DocVQA sample) x timed steps
/ timed seconds. Peak GPU memory = torch.cuda.max_memory_allocated (and _reserved in the JSON), GiB, max over
ranks, over the whole run. MFU = model FLOPs per second / (peak dense bf16 FLOPs x GPUs); model FLOPs per
sample (see `benchmarks.flops.training_flops`): forward 2N per token for every weight matrix N that the token
goes through, plus 4 * layers * seq_len * hidden per token for attention (QK^T and AV, no causal discount, as
PaLM); backward 2x forward for trainable weights (activation and weight gradients), 1x forward for frozen
weights that gradients pass through (LoRA base weights), none for frozen parts below every trainable one (the
frozen vision tower), 2x the attention forward wherever gradients flow. Full finetuning is thus 6N per token
plus attention (PaLM's formula). HFU also counts the gradient-checkpointing recompute (one more forward of the
checkpointed decoder and CLIP layers that take part in the backward). Vision FLOPs use the crops actually
encoded (global view + tiles, 577 CLIP tokens each), the projection the image tokens.

The data path (dataset item with PNG decode + processor + collator, one process, one thread) is timed on its
own and reported as samples/s per core next to the GPU numbers; a row whose training samples/s exceed that
times the available cores is flagged. `Data wait` is the share of the timed window the Trainer's main loop
spent fetching the micro-batches of the next optimizer step (host time, an upper bound on data stalls).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:  # common/ and benchmarks/ sit next to this file (`torchrun benchmark.py` from elsewhere)
    sys.path.insert(0, str(REPO))

from benchmarks.configs import DEFAULT_STRATEGIES, OFFICIAL_CONFIG  # noqa: E402
from common.arguments import build_parser  # noqa: E402
from common.cli import main_guard  # noqa: E402
from common.errors import UsageError  # noqa: E402
from common.strategy import STRATEGIES  # noqa: E402


def _page_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from error
    return width, height


def build_benchmark_parser() -> argparse.ArgumentParser:
    """The scripts' parser (DocVQA's num_crops 16; a short run's global batch 16, where the recipe's tables use
    --batch_size 64; bf16 by default, as the recipe measured, --no_bf16 for fp16 mixed) plus benchmark flags."""
    parser = build_parser(__doc__, num_crops=16, batch_size=16, warmup_steps=1, bf16=True, output_dir="output/benchmark",
                          dataloader_num_workers=None)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                       help=f"comma-separated, from {', '.join(STRATEGIES)} (default {DEFAULT_STRATEGIES})")
    bench.add_argument("--flash", choices=["auto", "both", "on", "off"], default="auto",
                       help="with and/or without flash attention (--use_flash_attention); auto: with it where it "
                            "can run (Ampere+ GPU, flash-attn installed), else without")
    bench.add_argument("--steps", type=int, default=3,
                       help="timed optimizer steps, after --warmup_steps untimed ones (which also set the LR warm-up)")
    model = bench.add_mutually_exclusive_group()
    model.add_argument("--tiny", action="store_true", help="the tiny random model (CPU smoke test)")
    model.add_argument("--random_init", action="store_true",
                       help="the full-size model from --model_config with random weights (no download)")
    bench.add_argument("--model_config", default=str(OFFICIAL_CONFIG), help="config.json for --random_init")
    bench.add_argument("--random_init_layers", type=int, default=None,
                       help="override the decoder depth of --random_init (quick checks only)")
    bench.add_argument("--no_bf16", dest="bf16", action="store_false", help="fp16 mixed precision instead of bf16")
    bench.add_argument("--cache_dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "phi35v_benchmark"),
                       help="where the random-init/tiny model and the page images are written once")
    bench.add_argument("--page_size", type=_page_size, default=(1700, 2200), help="synthetic page WIDTHxHEIGHT")
    bench.add_argument("--num_pages", type=int, default=4, help="distinct synthetic pages, cycled over")
    bench.add_argument("--data_samples", type=int, default=4, help="samples for the data-path timing (0: skip)")
    bench.add_argument("--prefetch_factor", type=int, default=None,
                       help="batches prefetched per data-loader worker (default: the scripts' value, an "
                            "optimizer step ahead up to 8)")
    bench.add_argument("--peak_tflops", type=float, default=None,
                       help="peak dense bf16 TFLOPs per GPU for MFU (default: from the device name)")
    bench.add_argument("--results_md", default=None, help="markdown table (default OUTPUT_DIR/benchmark.md)")
    bench.add_argument("--results_json", default=None, help="JSON rows (default OUTPUT_DIR/benchmark.json)")
    bench.add_argument("--config_timeout", type=int, default=3600, help="seconds before a configuration is abandoned")
    launch = parser.add_argument_group("launch (torchrun is started for every configuration when > 1 process)")
    launch.add_argument("--nproc_per_node", type=int, default=1, help="GPUs (processes) per node")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes; run the same command on each")
    launch.add_argument("--node_rank", type=int, default=0, help="this node's rank (multi-node)")
    launch.add_argument("--master_addr", default="127.0.0.1", help="rank-0 node address (multi-node)")
    launch.add_argument("--master_port", type=int, default=29500, help="rendezvous port (multi-node)")
    bench.add_argument("--batching", action="store_true",
                       help="instead of the strategies: padded vs packed micro-batches (benchmarks/batching.py) on "
                            "the DocVQA shape and a mixed-length set, in this process")
    launch.add_argument("--collect", action="store_true",
                        help="only write the report from the rows/*.json already in --output_dir")
    launch.add_argument("--worker", action="store_true", help="run one configuration in this process (torchrun)")
    launch.add_argument("--worker_result", default=None, help=argparse.SUPPRESS)
    launch.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # write the assets and exit
    return parser


def _batching(args) -> int:
    from benchmarks.batching import render_batching, run_batching

    report = run_batching(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "batching.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "batching.md").write_text(render_batching(report) + "\n")
    print(render_batching(report))
    print(f"wrote {output_dir / 'batching.md'} and {output_dir / 'batching.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_benchmark_parser().parse_args(argv)
    problems = []
    if args.steps < 1:
        problems.append(f"--steps must be at least 1, got {args.steps}")
    if args.warmup_steps < 1:
        problems.append(f"--warmup_steps must be at least 1 (the first step is never timed), got {args.warmup_steps}")
    if args.random_init and not Path(args.model_config).is_file():
        problems.append(f"--model_config {args.model_config} does not exist")
    if problems:
        raise UsageError("invalid arguments:\n  " + "\n  ".join(problems))
    return run(args, argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """What checked flags ask for; torch and transformers load here (CONTRIBUTING.md, Commands)."""
    from benchmarks.assets import asset_paths, prepare_assets
    from benchmarks.launcher import collect, run_all
    from benchmarks.report import render_markdown, result_paths
    from benchmarks.worker import run_worker

    if args.worker:
        return run_worker(args)
    if args.batching:
        return _batching(args)
    if args.prepare:
        prepare_assets(args)
        return 0
    if args.random_init and not asset_paths(args)[1].exists():
        # Built on the GPU when there is one: in a separate process, so that this launcher holds no CUDA
        # context (nor memory) while the configurations run.
        subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--prepare"], check=True)
    report = collect(args) if args.collect else run_all(args, argv)
    md, js = result_paths(args)
    print(render_markdown(report))
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
