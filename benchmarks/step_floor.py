"""How far a Safe-MM-DPO step on this CPU is from the machine's compute floor, and what each speed knob buys.

    .venv/bin/python benchmarks/step_floor.py                       # ~25 min on 2 cores: keep the machine quiet

The floor is measured in the same run: the matrix-multiply rate this CPU reaches on the model's own
GEMM shapes (each linear layer's forward product and the two products of its backward, at one
micro-batch's token count, in the run's dtype), and the step's FLOPs on its *real* tokens — every linear
layer's 2·k·n per token, three times (forward, input gradient, weight gradient), plus attention's scores
and weighted sums — so padding counts as waste, not work. The reference's log-probs are cached (as the
rm stage leaves them), so the step is one policy forward and backward over both responses.

Variants, each a fresh `benchmarks/dpo_step.py` child (the trainer the align stage runs, cached reference),
alternated round by round on the same rows, batch and machine:

- `before`: micro-batches cut in data order, ZeRO-2 (the evidence run's align settings);
- `grouped`: `group_by_length` on (each step's pairs sorted by length before cutting micro-batches);
- `grouped_zero0`: and ZeRO stage 0 (one process has nothing to partition);
- each of them `_jemalloc` / `_tcmalloc`: with that allocator via `LD_PRELOAD`, when Debian's
  `libjemalloc2` / `libtcmalloc-minimal4` is installed (glibc returns freed blocks above 32 MiB to the OS,
  so every micro-batch's logits fault their pages back in).

Rows (`--data`): the evidence recipe's mix by default (PKU-SafeRLHF and ten times as many HH-RLHF pairs,
shuffled), or the PKU sample alone (long answers, most cut at max_len: little padding to remove).

Results: benchmarks/results/step_floor-<data>.json and the table printed (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import dpo_step

HERE = Path(__file__).resolve().parent
ALLOCATORS = {
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}


def linear_shapes(config) -> list[tuple[int, int, int]]:
    """(in, out, count) of every linear product of one token in a Llama-style decoder, the LM head included."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = d // config.num_attention_heads * config.num_key_value_heads
    return [(d, d, 2 * layers), (d, kv, 2 * layers), (d, ff, 2 * layers), (ff, d, layers), (d, config.vocab_size, 1)]


def attention_flops_per_token(config, context: float) -> float:
    """Scores and weighted sum of one token against `context` keys, forward: 2 products of 2·d per key and layer."""
    return 2 * 2 * config.hidden_size * context * config.num_hidden_layers


def gemm_seconds(m: int, k: int, n: int, dtype, repeats: int = 5) -> float:
    """Best-of wall time of the three products a linear layer of shape k -> n runs for m tokens: forward
    (m×k)·(k×n), input gradient (m×n)·(n×k), weight gradient (k×m)·(m×n)."""
    import torch

    x, w, g = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    products = [lambda: x @ w, lambda: g @ w.T, lambda: x.T @ g]
    for product in products:
        product()  # warm-up: oneDNN picks and caches its kernel
    best = []
    for product in products:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return sum(best)


def measure_floor(setting: dpo_step.Setting, tokens_per_micro: int) -> dict:
    """The matmul rate on the model's shapes at one micro-batch's token count, FLOP/s, and the parts of it."""
    import torch
    from transformers import AutoConfig

    from safealign.models.resolve import resolve_model
    from safealign.openrlhf.settings import resolve_dtype

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[resolve_dtype(setting.dtype)]
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as scratch:
        config = AutoConfig.from_pretrained(resolve_model(dpo_step.recipe_for(setting, Path(scratch)).model.policy))
    flops = seconds = 0.0
    for k, n, count in linear_shapes(config):
        flops += 3 * 2 * tokens_per_micro * k * n * count
        seconds += gemm_seconds(tokens_per_micro, k, n, dtype) * count
    return {"dtype": str(dtype), "gemm_flops_per_s": flops / seconds, "config": config.to_dict()}


def step_flops(config: dict, real_tokens: float, context: float) -> float:
    """A policy forward and backward over `real_tokens` tokens (3× the forward's FLOPs)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**config)
    per_token = sum(2 * k * n * count for k, n, count in linear_shapes(cfg))
    return 3 * real_tokens * (per_token + attention_flops_per_token(cfg, context))


def variants(base: dpo_step.Setting) -> dict[str, tuple[dpo_step.Setting, dict]]:
    """name -> (setting, extra environment): each setting with glibc's allocator and with every allocator
    installed (`<setting>_<allocator>`)."""
    settings = {
        "before": replace(base, group_by_length=False, zero_stage=2),
        "grouped": replace(base, group_by_length=True, zero_stage=2),
        "grouped_zero0": replace(base, group_by_length=True, zero_stage=0),
    }
    table = {name: (setting, {}) for name, setting in settings.items()}
    for allocator, library in ALLOCATORS.items():
        if Path(library).exists():
            table.update({f"{name}_{allocator}": (s, {"LD_PRELOAD": library}) for name, s in settings.items()})
    return table


def run_child(args: list[str], env: dict | None = None) -> str:
    command = [sys.executable, str(HERE / "dpo_step.py"), *args]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def summarise(runs: list[dict], floor_flops_per_s: float, config: dict, context: float, pairs: int) -> dict:
    table = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        results = [r for r in runs if r["name"] == name]
        median = statistics.median(t for r in results for t in r["step_seconds"])
        floor = step_flops(config, results[0]["tokens_per_step"], context) / floor_flops_per_s
        table[name] = {
            "median_step_s": median,
            "s_per_pair": median / pairs,
            "padding": statistics.mean(r["padding"] for r in results),
            "floor_step_s": floor,
            "x_floor": median / floor,
        }
    first = next(iter(table.values()))
    for row in table.values():
        row["speedup"] = first["median_step_s"] / row["median_step_s"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(dpo_step.MODELS), default="smollm2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps per run (+1 warm-up)")
    parser.add_argument("--batch", type=int, default=16, help="the evidence recipe's align batch")
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=192)
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--data", choices=("evidence", "pku"), default="evidence",
                        help="rows: the evidence recipe's PKU + HH-RLHF mix, or the PKU sample alone")  # fmt: skip
    parser.add_argument("--variants", help="comma-separated subset of the variants (default: all)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/step_floor-<data>.json")
    args = parser.parse_args()
    base = dpo_step.Setting(args.model, args.steps, args.batch, args.micro, args.max_len, 2, args.dtype, data=args.data)
    chosen = variants(base)
    if args.variants:
        unknown = set(args.variants.split(",")) - set(chosen)
        if unknown:
            sys.exit(f"--variants: unknown {sorted(unknown)}; choose from {sorted(chosen)}")
        chosen = {name: chosen[name] for name in args.variants.split(",")}
    # one micro-batch's rows in the GEMMs: both responses of `micro` pairs at the longest length
    tokens_per_micro = 2 * args.micro * args.max_len
    floor_before = measure_floor(base, tokens_per_micro)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as scratch:
        reference = Path(scratch) / "reference_logps.json"
        run_child(["--child", "reference", *base.child_args(), f"--reference={reference}"])
        for round_ in range(args.rounds):
            for name, (setting, env) in chosen.items():
                out = run_child(["--child", "safe_mm_dpo_cached", *setting.child_args(), f"--reference={reference}"], env)
                result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
                runs.append({**result, "name": name, "setting": asdict(setting), "env": env})
                print(f"round {round_ + 1}: {name} median {statistics.median(result['step_seconds']):.2f} s/step", flush=True)
    floor_after = measure_floor(base, tokens_per_micro)
    rate = max(floor_before["gemm_flops_per_s"], floor_after["gemm_flops_per_s"])
    # attention context: a causal token sees on average half its sequence (the real tokens' mean length)
    context = runs[0]["tokens_per_step"] / (2 * args.batch) / 2
    table = summarise(runs, rate, floor_before["config"], context, args.batch)
    args.out = args.out or HERE / "results" / f"step_floor-{args.data}.json"
    args.out.parent.mkdir(exist_ok=True)
    record = {
        "settings": {**asdict(base), "rounds": args.rounds, "tokens_per_micro": tokens_per_micro},
        "floor": {"dtype": floor_before["dtype"], "gemm_flops_per_s": [floor_before["gemm_flops_per_s"],
                  floor_after["gemm_flops_per_s"]]},
        "table": table,
        "runs": runs,
    }  # fmt: skip
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nmatmul rate on the model's shapes: {rate / 1e9:.0f} GFLOP/s ({floor_before['dtype']})")
    dpo_step.print_markdown(["variant", "s/step (median)", "s/pair", "padding", "floor s/step", "× floor", "speed-up"], [
        [name, f"{r['median_step_s']:.2f}", f"{r['s_per_pair']:.3f}", f"{r['padding']:.0%}",
         f"{r['floor_step_s']:.2f}", f"{r['x_floor']:.2f}", f"{r['speedup']:.2f}"]
        for name, r in table.items()
    ])  # fmt: skip


if __name__ == "__main__":
    main()
