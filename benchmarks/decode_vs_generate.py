"""Benchmark: batch-1 greedy decode, this framework's loop versus transformers' ``generate``.

Same model, same prompt, same number of new tokens; the two alternate round by round (order swapped
every round) after warm-ups, GPU synchronized. Prints median latency and tokens/s side by side.

    python benchmarks/decode_vs_generate.py -c configs/variants/bf16-sdpa.yaml --new-tokens 128
"""

from __future__ import annotations

import argparse

import torch

from lightning_modules.measurement import compare_decoders
from smarter.lightning_cli import HEADLESS_TRAINER_ARGS, build_cli, quiet_known_warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args, overrides = parser.parse_known_args()  # the rest are CLI overrides, e.g. --model.source tiny
    args.overrides = overrides
    quiet_known_warnings()
    cli = build_cli(["-c", args.config, *HEADLESS_TRAINER_ARGS, *args.overrides], run=False)
    module, datamodule = cli.model, cli.datamodule
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.model = module.build_model(device).eval()
    prompt = datamodule.prompt_items()[0]["input_ids"][None].to(device)
    timings = compare_decoders(module.model, prompt, args.new_tokens, args.rounds, module.tokenizer.eos_id)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\nconfig {args.config} {' '.join(args.overrides)} on {device_name}, torch {torch.__version__}")
    print(f"batch 1, prompt {prompt.shape[1]} tokens, {args.new_tokens} new tokens, median of {args.rounds}:")
    ours, hf = timings.generate_latency_ms, timings.hf_generate_latency_ms
    print(f"{'transformers generate':>22}: {hf:9.1f} ms  {timings.hf_generate_tokens_per_s:7.1f} tok/s")
    print(
        f"{'smarter decode loop':>22}: {ours:9.1f} ms  {timings.our_generate_tokens_per_s:7.1f} tok/s"
        f"  (TTFT {timings.ttft_ms:.1f} ms, decode {timings.decode_tokens_per_s:.1f} tok/s)"
    )
    print(f"{'speed-up':>22}: {hf / ours:9.3f}x")


if __name__ == "__main__":
    main()
