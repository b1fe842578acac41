"""What the tests share besides fixtures (those are in conftest.py): the repository's paths, tiny
model and recipe builders, the CLI in a fresh process, crash helpers, and a stand-in for a judge API.

A plain module (`from support import run_cli`), not conftest: pytest discovers fixtures from conftest,
and a helper imported from there reads as if it were one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PKU = ROOT / "data" / "pku-saferlhf-sample" / "pku_saferlhf_alpaca7b_test_sample.jsonl"
HH = ROOT / "data" / "hh-rlhf-harmless" / "harmless-base-test-first300.jsonl"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pku_rows(n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in PKU.read_text(encoding="utf-8").splitlines()]
    return rows[:n] if n else rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tokenizer(out: Path, vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A byte-level BPE tokenizer trained on the PKU sample in about a second, saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r["prompt"] + r["response_0"] + r["response_1"] for r in pku_rows()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token="<|im_start|>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    return out


#: Optimiser settings that make a tiny random model move in a few steps (every test trainer uses them).
TINY_TRAINER = {
    "learning_rate": 2e-3,
    "batch_size": 4,
    "micro_batch_size": 2,
    "epochs": 1,
    "warmup_ratio": 0.0,
    "lr_scheduler": "constant",
}


def tiny_policy(tokenizer_dir: Path) -> dict:
    """The model section of a 2-layer, hidden-32 random Llama in fp32."""
    return {
        "policy": {"random": {"tokenizer": str(tokenizer_dir), "config": {"hidden_size": 32, "intermediate_size": 64}}},
        "dtype": "fp32",
    }


def tiny_cost_model(tokenizer_dir: Path) -> Path:
    """A value-head model with random weights standing in for the rm stage's cost model where a test
    runs align alone: its costs are arbitrary but fixed, which is all λ's mechanics need (a scorer that
    really runs on the policy's answers). Built once per tokenizer, next to it."""
    target = tokenizer_dir.parent / "tiny-cost-model"
    if (target / "config.json").is_file():
        return target
    import torch

    from safealign.models.resolve import build_random
    from safealign.openrlhf import get_llm_for_sequence_regression, patches
    from safealign.recipe import RandomModel

    patches.enable_fp32()  # OpenRLHF's loaders know only bf16/fp16 without the CPU patch
    base = build_random(RandomModel(tokenizer=str(tokenizer_dir), config={"hidden_size": 32, "intermediate_size": 64}))
    torch.manual_seed(1)
    model = get_llm_for_sequence_regression(
        str(base), "reward", param_dtype="fp32", attn_implementation="sdpa", init_value_head=True,
        value_head_prefix="score",
    )
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (base / name).exists():
            (staging / name).write_bytes((base / name).read_bytes())
    staging.rename(target)
    return target


#: Ĵ_C sampling sized for tiny models: 4 held-out prompts, 8 new tokens, λ updated every step.
TINY_COST_SAMPLING = {"prompts": 4, "max_new_tokens": 8, "batch_size": 4, "logged_answers": 2}
#: The align section of every tiny test recipe.
TINY_ALIGN = {**TINY_TRAINER, "lambda_update_every": 1, "cost_sampling": TINY_COST_SAMPLING}


def pipeline_recipe(tokenizer_dir: Path, rows: str, name: str, **sections) -> dict:
    """Every stage (rm → align → distill → eval) on an untied tiny random Llama (tied, it answers only
    "\n"); `sections` update the defaults by section."""
    model = tiny_policy(tokenizer_dir)
    model["policy"]["random"]["config"]["tie_word_embeddings"] = False
    recipe = {
        "name": name,
        "stages": ["rm", "align", "distill", "eval"],
        "model": model,
        "data": {"train": [{"path": rows}], "max_len": 512},
        "rm": {"helpful": TINY_TRAINER, "cost": {}, "eval_fraction": 0.0},
        "align": TINY_ALIGN,
        "distill": {"max_prompts": 8, "max_new_tokens": 8, "sft": TINY_TRAINER},
        "eval": {"beavertails_per_category": 1, "mt_bench_per_category": 1, "max_new_tokens": 6},
        "logging": {"tensorboard": False},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    return recipe


def llm_judged_eval(url: str) -> dict:
    """An eval section judged by refusal and an LLM judge at `url` (the judge_api stand-in)."""
    return {
        "beavertails_per_category": 1, "mt_bench_per_category": 1, "max_new_tokens": 6,
        "judges": ["refusal", "llm"], "llm_judge": {"url": url, "model": "stand-in", "retries": 0},
    }  # fmt: skip


#: The optimiser keys `shrink_overrides` sets on every trainer a shipped recipe runs.
SHRUNK_TRAINING = {"batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3}


def shrink_overrides(recipe_path: Path, tokenizer_dir: Path) -> list[str]:
    """`--set` overrides that shrink a shipped recipe to what CI can afford while keeping its structure
    (stages, data splits, ablations, groups, primary test, sweep axes): a 2-layer random Llama, 12 rows
    per training source, 6 per held-out one, tiny trainers and generations. Read from the recipe, so a
    recipe that gains a section is shrunk without editing the tests."""
    from safealign.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    policy = (f"{{random: {{tokenizer: {tokenizer_dir}, config: {{hidden_size: 32, intermediate_size: 64, "
              "num_hidden_layers: 2, tie_word_embeddings: false}}}")  # fmt: skip
    out = [f"model.policy={policy}", "model.dtype=fp32", "data.max_len=256", "logging.tensorboard=false"]
    out += [f"data.train.{i}.max_rows=12" for i in range(len(recipe.data.train))]
    trainers = ["align"]
    if "rm" in recipe.stages:
        trainers.append("rm.helpful")
        out += ["rm.helpful.trainable_layers=1"]  # the tiny model has 2 layers
    if "distill" in recipe.stages:
        trainers.append("distill.sft")
        out += ["distill.max_prompts=4", "distill.max_new_tokens=8"]
    for section in trainers:
        out += [f"{section}.{key}={value}" for key, value in SHRUNK_TRAINING.items()]
    out += ["align.cost_sampling.prompts=4", "align.cost_sampling.max_new_tokens=4", "align.lambda_update_every=1"]
    if recipe.align.max_pairs is not None:
        out += ["align.max_pairs=8"]
    if "eval" in recipe.stages:
        out += ["eval.max_new_tokens=4", "eval.beavertails_per_category=1", "eval.mt_bench_per_category=1"]
        out += [f"eval.heldout_pairs.{i}.max_rows=6" for i in range(len(recipe.eval.heldout_pairs))]
        if recipe.eval.heldout_cost_prompts:
            out += ["eval.heldout_cost_prompts=4"]
    if recipe.sweep is not None:  # the grid's corners on its first axis, the first value of the others
        axes = list(recipe.sweep.grid.items())
        grid = {axes[0][0]: [axes[0][1][0], axes[0][1][-1]], **{name: values[:1] for name, values in axes[1:]}}
        out += ["sweep.grid={" + ", ".join(f"{name}: {values}" for name, values in grid.items()) + "}"]
    return [item for override in out for item in ("--set", override)]


def tiny_recipe(tmp_path: Path, tokenizer_dir: Path, rows: Path, **sections) -> Path:
    """A recipe for a 2-layer, hidden-32 random Llama; `sections` update the defaults by section.

    Without an rm stage, the cost model that samples Ĵ_C is `tiny_cost_model` (a random value head)."""
    recipe = {
        "name": "tiny",
        "model": tiny_policy(tokenizer_dir),
        "data": {"train": [{"path": str(rows)}], "max_len": 128},
        "align": {**TINY_ALIGN, "cost_sampling": dict(TINY_COST_SAMPLING)},
        "logging": {"tensorboard": False},
    }
    if "rm" not in sections.get("stages", ["align"]):
        recipe["model"]["cost_model"] = str(tiny_cost_model(tokenizer_dir))
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str, cwd: Path, timeout: float = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`safealign ARGS` in a fresh process (DeepSpeed keeps a process group per process)."""
    env = {**clean_env(), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "safealign.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user's mistake: exit 2, one `safealign: error:` line holding every fragment, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("safealign: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def clean_env() -> dict:
    """This environment without a distributed launcher's variables (each `safealign run` is its own world)."""
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def kill_when(args: list[str], cwd: Path, ready, timeout: float = 300) -> None:
    """Start `safealign ARGS` and SIGKILL it as soon as `ready()` holds (polled every 20 ms): a crash at
    the worst moment, with no chance to clean up. Fails if the run ended first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "safealign.cli", *args],
        cwd=cwd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def torchrun_cli(
    *args: str, cwd: Path, nproc: int = 2, timeout: float = 600, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m safealign.cli ARGS` (gloo on CPU, NCCL on GPUs)."""
    return torchrun("-m", "safealign.cli", *args, cwd=cwd, nproc=nproc, timeout=timeout, extra_env=extra_env)


def torchrun(
    *target: str, cwd: Path, nproc: int = 2, timeout: float = 600, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N TARGET...` in a clean environment; a hang is killed with its workers."""
    with socket.socket() as sock:  # torchrun's --master_port 0 hangs the static rendezvous: pick one
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
               *target]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=cwd, env={**clean_env(), **(extra_env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # a hang: take torchrun's workers down with it
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "align" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_steps(run_dir: Path) -> list[dict]:
    return [m for m in read_metrics(run_dir) if "loss" in m]


class FakeJudgeAPI(BaseHTTPRequestHandler):
    """Answers /chat/completions with scripted replies: a stand-in for a paid judge API."""

    script: list = []
    requests: list = []
    probes: list = []  # GET /models: the eval stage's reachability check
    models_status = 200

    def do_GET(self):  # noqa: N802 (a redirected POST arrives as a GET)
        if self.path.endswith("/models"):
            type(self).probes.append({"auth": self.headers.get("Authorization"), "path": self.path})
            self.send_response(type(self).models_status)
            self.end_headers()
            return
        type(self).requests.append({"body": None, "auth": self.headers.get("Authorization"), "path": self.path})
        self.send_response(404)
        self.end_headers()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"body": body, "auth": self.headers.get("Authorization"), "path": self.path})
        content = body["messages"][-1]["content"]
        if any("[[rating]]" in m["content"] for m in body["messages"]):  # an MT-Bench grading request
            default = "Decent answer. Rating: [[7]]"
        elif "Step 1" in content:
            default = "Gives instructions. [[UNSAFE]]"
        else:
            default = "Refuses. [[SAFE]]"
        if body["messages"][-1]["role"] == "assistant":  # a Llama Guard request: the conversation itself
            default = "unsafe\nS2" if "Step 1" in content else "safe"
        type(self).requests[-1]["at"] = time.monotonic()
        action = type(self).script.pop(0) if type(self).script else default
        if isinstance(action, dict) and "redirect" in action:  # {"redirect": url}
            self.send_response(302)
            self.send_header("Location", action["redirect"])
            self.end_headers()
            return
        if isinstance(action, dict):  # {"status": 429, "retry_after": "1"}: a rate limit
            self.send_response(action["status"])
            self.send_header("Retry-After", action["retry_after"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if isinstance(action, int):
            self.send_response(action)
            self.end_headers()
            return
        if action == "sleep":
            time.sleep(1.0)
            action = "[[SAFE]]"
        payload = {"choices": [{"message": {"role": "assistant", "content": action}}]}
        if action == "garbage":
            payload = {"unexpected": True}
        data = action if isinstance(action, bytes) else json.dumps(payload).encode()  # bytes: the raw reply
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:  # the client timed out first: that is the case under test
            pass

    def log_message(self, *args):
        pass
