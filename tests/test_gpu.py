"""What only a GPU can show, run by `make gpu-smoke` on a machine with NVIDIA GPUs (skipped elsewhere, with
the reason): the tiny recipe through every stage on however many GPUs are visible, at the seed recipe's
settings — ZeRO-2 (the seed recipe's) and ZeRO-3 (larger models'), gradient checkpointing, bf16, Ĵ_C
sampled from the policy every step (under ZeRO-3 its weights gathered once per estimate) — with a
head_dim of 128 so the attention kernels are the ones a 7B model gets. rm, align and distill run under torchrun (NCCL, one rank per GPU), eval as one process with vLLM
spread over the GPUs; a pod-like `SAFEALIGN_REQUIRE_GPU=1` is set throughout. Minutes, not hours: a
random 2-layer model. It ends by printing what it proved, one row per claim.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from support import TINY_TRAINER, pipeline_recipe, pku_rows, run_cli, torchrun_cli, write_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible (make gpu-smoke on a GPU machine)")

#: A random Llama whose attention has Mistral-7B's head_dim (4096 / 32 = 128), so SDPA picks the same
#: flash / memory-efficient kernels a real run does; 2 layers keep it small.
SEED_SHAPED = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 1,
               "head_dim": 128, "tie_word_embeddings": False}  # fmt: skip


def print_table(rows: list[tuple[str, str, bool]]) -> None:
    width = max(len(claim) for claim, _, _ in rows)
    print(f"\n{'what the GPU smoke test proved':<{width}}  {'seen':<40}  ok")
    for claim, seen, ok in rows:
        print(f"{claim:<{width}}  {seen:<40}  {'yes' if ok else 'NO'}")


@pytest.mark.parametrize("zero_stage", [2, 3])  # the seed recipe's, and the one larger models need
def test_every_stage_on_the_visible_gpus_at_the_seed_settings(tmp_path, tokenizer_dir, zero_stage):
    gpus = torch.cuda.device_count()
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(16 * gpus + 8))  # a few global batches of 4 × GPUs pairs
    trainer = {**TINY_TRAINER, "batch_size": 4 * gpus, "micro_batch_size": 2}
    recipe = pipeline_recipe(
        tokenizer_dir, "pku.jsonl", "gpu",
        model={"dtype": "bf16", "attn_implementation": "auto", "gradient_checkpointing": True},
        data={"max_len": 256},
        deepspeed={"zero_stage": zero_stage},
        rm={"helpful": trainer, "cost": {}},
        align={**trainer, "lambda_update_every": 1,
               "cost_sampling": {"prompts": 2 * gpus, "max_new_tokens": 16, "batch_size": 2}},
        distill={"sft": trainer, "max_prompts": 8 * gpus},
        eval={"backend": "vllm", "max_new_tokens": 8},
    )  # fmt: skip
    recipe["model"]["policy"]["random"]["config"].update(SEED_SHAPED)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {"SAFEALIGN_REQUIRE_GPU": "1"}
    train = torchrun_cli("run", "recipe.yaml", "--stage", "rm", "--stage", "align", "--stage", "distill",
                         cwd=tmp_path, nproc=gpus, timeout=1800, extra_env=env)  # fmt: skip
    assert train.returncode == 0, train.stderr[-4000:]
    evaluate = run_cli("run", "recipe.yaml", "--stage", "eval", cwd=tmp_path, timeout=1800, extra_env=env)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]

    run = tmp_path / "runs/gpu"
    align = json.loads((run / "align/stage.json").read_text())
    samples = [json.loads(line) for line in (run / "align/lambda_samples.jsonl").read_text().splitlines()]
    results = json.loads((run / "eval/results.json").read_text())
    backends = {m["generation"]["backend"] for m in results["models"].values()}
    log = train.stderr + train.stdout
    rows = [
        ("every training stage ran on all GPUs (NCCL)", f"{align['processes']} ranks, {gpus} GPUs", align["processes"] == gpus),
        ("flash-attn absent: OpenRLHF imported, SDPA chosen", "no ModuleNotFoundError", "flash_attn" not in train.stderr),
        ("no DeepSpeed op JIT-built (torch's fused AdamW)", "no FusedAdam/CPUAdam build", "fused_adam" not in log and "cpu_adam" not in log),
        (f"ZeRO-{zero_stage} + gradient checkpointing + bf16 trained", f"{len(samples)} Ĵ_C estimates", len(samples) >= 2),
        ("Ĵ_C sampled from the policy (ZeRO-3: weights gathered once)", f"{sum(s['new_tokens'] for s in samples)} new tokens", all(s["new_tokens"] > 0 for s in samples)),
        ("eval generated with vLLM and shut it down", ", ".join(sorted(backends)), backends == {"vllm"}),
    ]  # fmt: skip
    print_table(rows)
    assert all(ok for _, _, ok in rows), rows
