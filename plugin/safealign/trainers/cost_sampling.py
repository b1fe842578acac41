"""Ĵ_C as Safe RLHF estimates it: the mean cost of what the policy answers *now*.

Safe RLHF's constraint is on `J_C(θ) = E_{x, y∼πθ}[C(x, y)]`. Every `align.lambda_update_every`
optimizer steps the policy being trained answers a fixed pool of prompts (held out of the training rows,
so the policy never trains on them; never eval prompts), the cost model of the rm stage scores the
answers, and their mean is the estimate the dual update of `safealign.domain.lagrange` steps on.

Why an estimate from stored pairs would not do: weighting a pair's two stored costs by the policy's
preference between them is bounded, per pair, by those two costs. Where both stored answers are unsafe
it stays above a threshold of 0 whatever the policy does, and λ follows the data, not the policy.

How the work is split and what it costs:
- generation runs on the training engine's own model (HF `generate`, eval mode, KV cache), sampled
  with `align.cost_sampling.temperature` in a forked RNG so the training's random stream is untouched;
  seeded by the run's seed plus the step (a fresh draw per update, Safe RLHF's estimator) or, with
  `common_random_numbers`, by the seed alone: every update then draws with the same random stream, so
  two estimates differ by what the policy changed rather than by resampling noise — the variance of
  Ĵ_C − d shrinks where d is calibrated on the same stream (`cost_threshold: initial`);
  with several ranks the eval stage's `ShardedGenerator` gives each its equal share of the pool (so
  ZeRO-3's `synced_gpus` generation stays in lockstep) and gathers the answers, and scoring is sharded
  and all-reduced, so every rank holds every cost and steps λ identically;
- the cost model lives in host memory between updates and visits the accelerator only while it scores
  (on a CPU-only machine it simply stays resident: its weights are the whole price);
- each update writes the first `align.cost_sampling.logged_answers` prompts' answers and costs to
  `lambda_samples.jsonl` (the same prompts every time: a reader sees what λ reacted to change).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from safealign.core.errors import SafeAlignError
from safealign.core.process import gpu_available
from safealign.domain.data import Message, PreferenceRow
from safealign.domain.generation import GenerationRequest, HFGenerator, ShardedGenerator
from safealign.domain.metrics import MetricsLog
from safealign.models.pooled_value import TORCH_DTYPES, PooledValueModel, is_pooled, read_spec
from safealign.openrlhf import engine, get_llm_for_sequence_regression
from safealign.openrlhf.pair_dataset import PreferencePairDataset
from safealign.openrlhf.scoring import score_pairs
from safealign.openrlhf.settings import VALUE_HEAD, Settings
from safealign.recipe import Recipe
from safealign.recipe.schema import CostSamplingSection

log = logging.getLogger("safealign")

#: Prompts plus answers are scored with room to spare: an answer cut short would be scored on less text.
SCORE_MAX_LEN = 2048


@dataclass
class CostSample:
    """One estimate: the pool's answers (every rank holds all of them), their costs and summaries."""

    prompts: list[list[Message]]
    answers: list[str]
    costs: list[float]
    threshold: float
    seconds: float
    new_tokens: int = 0

    @property
    def mean_cost(self) -> float:
        return math.fsum(self.costs) / len(self.costs)

    @property
    def cost_spread(self) -> float:
        """The standard deviation of the answers' costs: the cost model's scale on this policy's answers."""
        return statistics.pstdev(self.costs)

    @property
    def above_threshold(self) -> float:
        """Share of answers whose cost exceeds the threshold (for cost models: > 0 reads as unsafe)."""
        return sum(c > self.threshold for c in self.costs) / len(self.costs)


class CostModel:
    """The rm stage's cost model (a value head), kept in host memory, scoring (prompt, answer) pairs."""

    def __init__(self, model_dir: Path, recipe: Recipe, args: Settings, strategy) -> None:
        if not (model_dir / "config.json").is_file():
            raise SafeAlignError(f"cost model {model_dir} not found: run the rm stage first or set model.cost_model")
        self.recipe, self.strategy = recipe, strategy
        # A pooled model scores at the length it was fitted at (its pooling sees what training saw).
        self.pooled = is_pooled(model_dir)
        self.max_len = SCORE_MAX_LEN
        if self.pooled:
            spec = read_spec(model_dir)
            self.max_len = spec["max_len"]
            self.model = PooledValueModel.load(model_dir, TORCH_DTYPES[spec["dtype"]])
        else:
            # ds_config=None: a plain, unpartitioned module, so it can stay on the host between updates.
            self.model = get_llm_for_sequence_regression(
                str(model_dir),
                "reward",
                param_dtype=args.ds.param_dtype,
                attn_implementation=args.ds.attn_implementation,
                ds_config=None,
                init_value_head=False,
                value_head_prefix=VALUE_HEAD,
                packing_samples=False,
            ).eval()
        self.model.requires_grad_(False)
        backbone = self.model.backbone if self.pooled else self.model
        self.tokenizer = engine.load_tokenizer(model_dir, backbone, strategy, padding_side="left")
        self.device = torch.device("cuda", torch.cuda.current_device()) if gpu_available() else None

    def answer_room(self, prompts: list[list[Message]]) -> list[int]:
        """Tokens each prompt leaves for an answer within the length this model scores at (formatted as
        scoring formats it: chat template or input template)."""
        rows = [PreferenceRow(prompt=p, response_0=" ", response_1=" ") for p in prompts]
        dataset = PreferencePairDataset(
            rows, self.tokenizer, 2**30, self.strategy, self.recipe.data.input_template, for_reward_model=True
        )
        lengths = {extra["row_index"]: extra["prompt_len"] for extra in dataset.extras}
        return [self.max_len - lengths[i] - 1 for i in range(len(rows))]  # - 1: the end-of-sequence token

    def score(self, prompts: list[list[Message]], answers: list[str], batch_size: int) -> list[float]:
        """The cost of every answer, in order; the work is sharded over ranks and the result all-reduced."""
        rows = [PreferenceRow(prompt=p, response_0=a or " ", response_1=a or " ") for p, a in zip(prompts, answers)]
        dataset = PreferencePairDataset(
            rows, self.tokenizer, self.max_len, self.strategy, self.recipe.data.input_template, for_reward_model=True
        )
        if len(dataset) != len(rows):
            raise SafeAlignError(f"a cost-sampling prompt is longer than {self.max_len} tokens: use shorter prompts")
        if self.device is not None:
            self.model.to(self.device)
        device = next(self.model.parameters()).device
        try:
            # Both slots hold the same answer; only the first is run (one forward per answer).
            costs = score_pairs(
                dataset,
                lambda batch: (self._forward(batch, device),),
                self.strategy,
                batch_size,
                progress=False,  # one log line per update says what happened; bars inside the training bar would not
            )
        finally:
            if self.device is not None:
                self.model.to("cpu")
                torch.cuda.empty_cache()
        order = {extra["row_index"]: i for i, extra in enumerate(dataset.extras)}
        return [float(costs[order[i], 0]) for i in range(len(rows))]

    def _forward(self, batch, device) -> torch.Tensor:
        """The costs of a batch's first responses."""
        ids, mask = batch[0].to(device), batch[1].to(device)
        if self.pooled:
            return self.model(ids, mask, batch[-1].prompt_lens)
        return self.model(ids, attention_mask=mask).float()


def cost_requests(prompts: list[list[Message]], settings: CostSamplingSection) -> list[GenerationRequest]:
    """Every prompt as a policy is asked it wherever its Ĵ_C is estimated — align's λ update and the eval's
    held-out Ĵ_C alike (`align.cost_sampling`: temperature, new tokens), so the two differ only in prompts."""
    return [
        GenerationRequest.from_chat(prompt, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
        for prompt in prompts
    ]


class PolicyCostSampler:
    """Ĵ_C from the policy's own answers to a fixed prompt pool, scored by the cost model."""

    def __init__(
        self,
        prompts: list[list[Message]],
        cost_model: CostModel,
        recipe: Recipe,
        policy_tokenizer,
        strategy,
        samples_path: Path,
    ) -> None:
        if not prompts:
            raise SafeAlignError("align.cost_sampling.prompts must be at least 1 to sample Ĵ_C")
        self.prompts = prompts
        self.cost_model = cost_model
        self.settings = recipe.align.cost_sampling
        self.seed = recipe.seed
        self.input_template = recipe.data.input_template
        self.zero3 = recipe.deepspeed.zero_stage == 3
        self.tokenizer = policy_tokenizer
        self.strategy = strategy
        self.samples_log = MetricsLog(samples_path, enabled=strategy.is_rank_0())

    def answer(self, policy_engine, step: int) -> tuple[list[str], int]:
        """Every pool prompt's answer from the policy (`policy_engine`: its DeepSpeed engine; on several ranks:
        sharded, gathered), and the new tokens made. Under ZeRO-3 the weights are gathered once for the
        whole estimate (`cost_sampling.gather_weights`), else once per generated token in lockstep."""
        policy = policy_engine.module
        requests = cost_requests(self.prompts, self.settings)
        several = getattr(self.strategy, "world_size", 1) > 1
        gather = self.zero3 and self.settings.gather_weights
        generator = HFGenerator(
            policy,
            self.tokenizer,
            batch_size=self.settings.batch_size,
            seed=self.seed if self.settings.common_random_numbers else self.seed + step,
            input_template=self.input_template,
            synced_gpus=self.zero3 and several and not gather,
            progress=False,
        )
        if several:
            generator = ShardedGenerator(generator)
        was_training = policy.training
        policy.eval()
        devices = [torch.cuda.current_device()] if gpu_available() else []
        try:
            with torch.random.fork_rng(devices=devices), engine.full_weights(policy_engine) if gather else nullcontext():
                answers = generator.generate(requests)
        finally:
            policy.train(was_training)
        return answers, generator.stats.new_tokens

    def estimate(self, policy_engine, step: int, threshold: float | None) -> CostSample:
        """Sample the pool's answers from `policy` and score them: one Ĵ_C estimate, against λ's threshold
        (None: this estimate calibrates it, `align.cost_threshold: initial`, so it is its own mean)."""
        started = time.time()
        answers, new_tokens = self.answer(policy_engine, step)
        costs = self.cost_model.score(self.prompts, answers, self.settings.batch_size)
        return CostSample(
            prompts=self.prompts,
            answers=answers,
            costs=costs,
            threshold=math.fsum(costs) / len(costs) if threshold is None else threshold,
            seconds=time.time() - started,
            new_tokens=new_tokens,
        )

    def record(self, step: int, sample: CostSample, lambda_next: float) -> None:
        """One line of `lambda_samples.jsonl`: the estimate, λ after it, and the first few answers."""
        shown = range(min(self.settings.logged_answers, len(sample.answers)))
        self.samples_log.write(
            {
                "step": step,
                "cost_mean": sample.mean_cost,
                "above_threshold": sample.above_threshold,
                "lambda_next": lambda_next,
                "seconds": round(sample.seconds, 3),
                "new_tokens": sample.new_tokens,
                "answers": [
                    {"prompt": sample.prompts[i][-1]["content"], "answer": sample.answers[i], "cost": sample.costs[i]}
                    for i in shown
                ],
            }
        )
        log.info(
            "align: step %d, Ĵ_C %.4g from %d sampled answers (%.0f%% above the threshold %.3g), λ → %.4g, %.1f s",
            step, sample.mean_cost, len(sample.costs), 100 * sample.above_threshold, sample.threshold,
            lambda_next, sample.seconds,
        )  # fmt: skip
