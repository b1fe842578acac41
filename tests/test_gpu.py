"""What only a GPU can show, run by `make gpu-smoke` on a machine with NVIDIA GPUs (skipped elsewhere, with
the reason): the tiny recipe through every stage on however many GPUs are visible — rm, align and distill
under torchrun (NCCL, one rank per GPU), eval as one process with vLLM spread over the GPUs by tensor
parallelism, a pod-like `SAFEALIGN_REQUIRE_GPU=1` set throughout. Minutes, not hours: a random 2-layer model.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import TINY_TRAINER, pipeline_recipe, pku_rows, run_cli, torchrun_cli, write_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible (make gpu-smoke on a GPU machine)")


def test_every_stage_on_the_visible_gpus(tmp_path, tokenizer_dir):
    gpus = torch.cuda.device_count()
    write_jsonl(tmp_path / "pku.jsonl", pku_rows(16 * gpus + 8))  # a few global batches of 4 × GPUs pairs
    trainer = {**TINY_TRAINER, "batch_size": 4 * gpus, "micro_batch_size": 2}
    recipe = pipeline_recipe(
        tokenizer_dir, "pku.jsonl", "gpu",
        model={"dtype": "bf16", "attn_implementation": "auto"},
        data={"max_len": 256},
        rm={"helpful": trainer, "cost": trainer}, align=trainer, distill={"sft": trainer, "max_prompts": 8 * gpus},
        eval={"backend": "vllm", "max_new_tokens": 8},
    )  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {"SAFEALIGN_REQUIRE_GPU": "1"}
    train = torchrun_cli("run", "recipe.yaml", "--stage", "rm", "--stage", "align", "--stage", "distill",
                         cwd=tmp_path, nproc=gpus, timeout=1800, extra_env=env)  # fmt: skip
    assert train.returncode == 0, train.stderr[-4000:]
    evaluate = run_cli("run", "recipe.yaml", "--stage", "eval", cwd=tmp_path, timeout=1800, extra_env=env)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    run = tmp_path / "runs/gpu"
    assert json.loads((run / "align/stage.json").read_text())["processes"] == gpus
    results = json.loads((run / "eval/results.json").read_text())
    assert {m["generation"]["backend"] for m in results["models"].values()} == {"vllm"}
