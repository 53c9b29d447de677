"""Generation throughput for a batch of mixed-length prompts on the shipped mini DroPE model (CPU; README figure).

python scripts/generation_throughput.py [--prompts 8] [--new-tokens 32] [--rounds 3]

Five ways (benchmarks/generation.py): continuous batching (`generate_batch`) on drope's kernels (drope_cb), sdpa and
paged|eager, one left-padded `generate` on drope_triton and on sdpa (on the CPU drope's kernels are its PyTorch
kernels, TRITON_INTERPRET unset).
Prompts of 32..200 tokens, within the model's training length. Prints tokens/s and how many requests equal their
prompt's greedy tokens generated alone.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: on the CPU a user runs drope's PyTorch kernels, not Triton's interpreter")

import torch  # noqa: E402

import drope  # noqa: E402,F401  (registers drope_triton and the DroPE classes)
from benchmarks import generation  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ROOT / "drope" / "demo" / "checkpoints" / "drope").eval()
    n = args.prompts
    lengths = [32 + i * (200 - 32) // max(1, n - 1) for i in range(n)]
    prompts = generation.mixed_prompts(lengths, model.config.vocab_size)
    model.set_attn_implementation("sdpa")
    want = generation.greedy_alone(model, prompts, args.new_tokens)
    print(f"{n} prompts of {lengths[0]}..{lengths[-1]} tokens, {args.new_tokens} new tokens each, "
          f"{args.threads} threads, median of {args.rounds} rounds")
    print("| way | first call ms | ms | tokens/s | requests equal to greedy alone |\n|---|---|---|---|---|")
    for provider in generation.GENERATION_PROVIDERS:
        s = generation.measure(model, prompts, provider, args.new_tokens, rounds=args.rounds, want=want)
        way = (f"generate_batch, {provider}" if provider in generation.CB_PROVIDERS
               else f"generate (left-padded), {provider.replace('_padded', '')}")
        print(f"| {way} | {s['first_ms']:.0f} | {s['ms']:.0f} | {s['tokens_per_s']:.0f} | {s['agree']} / {n} |",
              flush=True)


if __name__ == "__main__":
    main()
