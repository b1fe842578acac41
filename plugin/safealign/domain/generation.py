"""Answer prompts with a model: batched Hugging Face `generate` everywhere, vLLM where it can run.

Both backends take chat messages, format them as training did (the tokenizer's chat template, or
`data.input_template` for a model without one, through `format_prompt`), and return the new text
only. `make_generator(..., backend="auto")` picks vLLM when the package is installed and a GPU is
present, else the HF backend; the eval and distill stages only see the `Generator` interface.

HF backend, and why it is shaped so: prompts are left-padded (decoder-only models continue from the
right edge), sorted by length so a batch wastes little padding, grouped by sampling settings
(MT-Bench uses FastChat's per-category temperatures), and generated with the KV cache on. Greedy
decoding of a batch equals one-by-one decoding (a test checks it), so batching is a pure speed-up.
Sampled batches each draw from their own random stream (`batch_seed`), the same one whenever the same
prompts are asked in the same place: two models answer with common random numbers, and a mean over
many answers varies as a mean over independent answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from safealign.core.errors import SafeAlignError
from safealign.core.process import gpu_available, release_memory
from safealign.domain.data import flatten_messages

log = logging.getLogger("safealign")


@dataclass(frozen=True)
class GenerationRequest:
    """One conversation to continue: chat messages ending with a user turn."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, hashable for caching
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy

    @classmethod
    def single_turn(cls, prompt: str, **kwargs) -> GenerationRequest:
        return cls(messages=(("user", prompt),), **kwargs)

    @classmethod
    def from_chat(cls, messages: list[dict[str, str]], **kwargs) -> GenerationRequest:
        """A request for a chat prompt as the data holds it (`{"role", "content"}` dicts; `chat()`'s inverse)."""
        return cls(messages=tuple((m["role"], m["content"]) for m in messages), **kwargs)

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class GenerationStats:
    answers: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    backend: str = ""

    @property
    def answers_per_second(self) -> float:
        return self.answers / self.seconds if self.seconds else 0.0


def format_prompt(tokenizer, request: GenerationRequest, input_template: str | None) -> str:
    """The prompt text the model was trained on: `input_template` when given, else the chat template."""
    if input_template is not None:
        return input_template.format(flatten_messages(request.chat()))
    if not getattr(tokenizer, "chat_template", None):
        raise SafeAlignError('the model has no chat template: set data.input_template, e.g. "Human: {}\\nAssistant: "')
    return tokenizer.apply_chat_template(request.chat(), tokenize=False, add_generation_prompt=True)


class Generator(Protocol):
    stats: GenerationStats

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """The answer to every request, in request order."""

    def close(self) -> None:
        """Give back what the generator holds on the accelerator, before the next model loads."""


def wait_for_gpu_memory(free_before: int, timeout: float = 120.0, slack: int = 2**30) -> bool:
    """Wait until the GPU has (about) as much free memory as `free_before` again: a vLLM engine's worker
    processes exit asynchronously after shutdown, and the next model must not load beside them (an
    out-of-memory error, or vLLM sizing its KV cache to the leftovers). False on timeout."""
    import torch

    deadline = time.monotonic() + timeout
    while torch.cuda.mem_get_info()[0] + slack < free_before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def batch_seed(seed: int, number: int, prompts: list[list[int]]) -> int:
    """The random stream generation batch `number` of a call samples from: the generator's seed, the batch's
    place and its prompts' tokens.

    Why not the seed alone, as before: reseeding every batch with one seed hands each batch the same random
    numbers, so the sampling luck of a row is shared by that row of every batch and a mean over the answers
    moves as one — a model's held-out Ĵ_C on 200 prompts varied with the seed by sd 0.15, 2.7 times what
    independent answers give (docs/results/issue-25.md, the noise diagnostic). Why the prompts: on several
    ranks (`ShardedGenerator`) each rank's batch `number` holds other prompts and must not share a stream.
    The same requests still get the same streams: a rerun reproduces its answers, and two models asked the
    same prompts sample with common random numbers."""
    digest = hashlib.sha256(json.dumps([seed, number, prompts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch.manual_seed takes a non-negative int64


class HFGenerator:
    """Batched `model.generate` with left padding, length-sorted batches and the KV cache.

    Wraps a loaded model, so the eval stage (a checkpoint loaded for it, `from_pretrained`) and the
    align trainer (the policy it is training, to sample Ĵ_C) generate through the same code.
    `synced_gpus` is for a ZeRO-3-partitioned model: every rank keeps stepping until all are done.
    """

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 8,
        seed: int = 0,
        input_template: str | None = None,
        synced_gpus: bool = False,
        progress: bool = True,
    ) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self.seed = seed
        self.input_template = input_template
        self.synced_gpus = synced_gpus
        self.progress = progress
        self.device = next(model.parameters()).device
        self.stats = GenerationStats(backend="hf")

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Path,
        batch_size: int = 8,
        dtype: str = "fp32",
        seed: int = 0,
        input_template: str | None = None,
        trust_remote_code: bool = False,
    ) -> HFGenerator:
        """A checkpoint loaded for generation: on the GPU when there is one."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = "cuda" if gpu_available() else "cpu"
        trusted = {"trust_remote_code": trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left", **trusted)
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, **trusted).to(device).eval()
        return cls(model, tokenizer, batch_size=batch_size, seed=seed, input_template=input_template)

    def close(self) -> None:
        """Drop the model this generator holds (the caller may hold it too: the align trainer's policy)."""
        self.model = None
        release_memory()

    def _encode(self, request: GenerationRequest) -> list[int]:
        text = format_prompt(self.tokenizer, request, self.input_template)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        encoded = [self._encode(r) for r in requests]
        groups: dict[tuple[int, float], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.max_new_tokens, request.temperature), []).append(i)
        answers: list[str] = [""] * len(requests)
        started = time.time()
        bar = tqdm(
            total=len(requests), desc=f"generating ({self.stats.backend})", unit="answer", disable=not self.progress
        )
        number = 0
        for (max_new_tokens, temperature), members in groups.items():
            members.sort(key=lambda i: (len(encoded[i]), i))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                texts = self._generate_batch([encoded[i] for i in chunk], max_new_tokens, temperature, number)
                number += 1
                for i, text in zip(chunk, texts):
                    answers[i] = text
                bar.update(len(chunk))
                elapsed = time.time() - started
                bar.set_postfix({"answers/s": f"{bar.n / elapsed:.2f}" if elapsed else "-"})
        bar.close()
        self.stats.answers += len(requests)
        self.stats.seconds += time.time() - started
        return answers

    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, number: int) -> list[str]:
        """Batch `number` of this call (its place picks its random stream, `batch_seed`, when it samples)."""
        torch = self.torch
        batch = self.tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(self.device)
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        )
        if temperature > 0:
            torch.manual_seed(batch_seed(self.seed, number, prompts))
        with torch.no_grad():
            output = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                synced_gpus=self.synced_gpus,
                **sampling,
            )
        new = output[:, batch["input_ids"].shape[1] :]
        self.stats.new_tokens += int((new != self.tokenizer.pad_token_id).sum())
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


class VLLMGenerator:
    """vLLM's continuous batching (GPU only). Same interface; selected automatically when possible."""

    def __init__(
        self, model_dir: Path, dtype: str = "bf16", seed: int = 0, input_template: str | None = None, **engine_kwargs
    ) -> None:
        import torch
        from vllm import LLM

        self.free_before = torch.cuda.mem_get_info()[0]
        self.llm = LLM(
            model=str(model_dir), dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype], seed=seed, **engine_kwargs
        )
        self.input_template = input_template
        self.stats = GenerationStats(backend="vllm")

    def close(self) -> None:
        """Shut the engine down explicitly — its engine-core process and tensor-parallel workers, then
        vLLM's process groups — instead of trusting `del` and the garbage collector to find every
        reference, and wait until the GPUs' memory is back before the next model loads."""
        if self.llm is None:
            return
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(core, "shutdown", None)):
            core.shutdown()
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
        self.llm = None
        release_memory()
        if not wait_for_gpu_memory(self.free_before):
            log.warning("vLLM: GPU memory not yet back after the engine's shutdown; loading the next model anyway")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        from vllm import SamplingParams

        started = time.time()
        params = [SamplingParams(max_tokens=r.max_new_tokens, temperature=r.temperature) for r in requests]
        if self.input_template is None:
            outputs = self.llm.chat([r.chat() for r in requests], params, use_tqdm=True)
        else:
            # Token ids, not text: vLLM would tokenize text with the BOS that neither the HF path nor
            # OpenRLHF's training datasets add (add_special_tokens=False everywhere else).
            tokenizer = self.llm.get_tokenizer()
            texts = [format_prompt(None, r, self.input_template) for r in requests]
            ids = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
            outputs = self.llm.generate(ids, params, use_tqdm=True)
        self.stats.answers += len(requests)
        self.stats.seconds += time.time() - started
        return [out.outputs[0].text.strip() for out in outputs]


class ShardedGenerator:
    """A generator split over the ranks of a torchrun world: each rank answers every `world`-th request
    on its own GPU, and every rank gets all answers back in request order (gathered), so what follows —
    judging, caching by rank 0 — sees one set of answers, generated once. Shares are equal (the last
    ranks repeat a request or two and drop the answer): every rank then makes the same generate calls,
    which a ZeRO-3-partitioned model (`synced_gpus`) needs to stay in lockstep."""

    def __init__(self, inner: Generator) -> None:
        import torch.distributed as dist

        self.inner = inner
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.stats = GenerationStats(backend=f"{inner.stats.backend} × {self.world} ranks")

    def close(self) -> None:
        self.inner.close()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        import torch.distributed as dist

        n = len(requests)
        positions = range(self.rank, math.ceil(n / self.world) * self.world, self.world)
        started, tokens_before = time.time(), self.inner.stats.new_tokens
        answers = self.inner.generate([requests[p % n] for p in positions]) if n else []
        mine = [(p, a) for p, a in zip(positions, answers) if p < n]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (mine, self.inner.stats.new_tokens - tokens_before))
        ordered = [""] * n
        for part, _ in gathered:
            for i, text in part:
                ordered[i] = text
        # The world's throughput: every answer and token, over this call's wall time.
        self.stats.answers += n
        self.stats.new_tokens += sum(tokens for _, tokens in gathered)
        self.stats.seconds += time.time() - started
        return ordered


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def vllm_usable() -> bool:
    """vLLM needs its package and a GPU; on anything else the HF backend runs."""
    if not gpu_available():
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """The backend that will answer: `auto` is vLLM where usable, else HF; `hf` and `vllm` are themselves;
    under torchrun always HF (sharded, see `make_generator`). The eval cache keys answers by it."""
    return "vllm" if world_size() == 1 and _asks_for_vllm(backend) else "hf"


def _asks_for_vllm(backend: str) -> bool:
    return backend == "vllm" or (backend == "auto" and vllm_usable())


def make_generator(
    model_dir: Path,
    backend: str = "auto",
    batch_size: int = 8,
    dtype: str = "fp32",
    seed: int = 0,
    input_template: str | None = None,
    trust_remote_code: bool = False,
) -> Generator:
    """`backend`: auto (vLLM where usable, else HF), hf, or vllm. `trust_remote_code`: the recipe's consent
    to a model folder's own Python (`safealign.core.remote_code`).

    In one process vLLM spreads the model over every visible GPU by tensor parallelism (the eval chart
    runs that way). Under torchrun the HF backend runs on each rank's own GPU and the requests are
    sharded over the ranks (`ShardedGenerator`): a vLLM engine per rank would fight the training world
    for the same GPUs and process group."""
    if world_size() > 1:
        if _asks_for_vllm(backend):
            log.warning("generation: %d processes (torchrun): the HF backend, sharded over the ranks, instead of "
                        "vLLM; run the eval stage as one process to use vLLM's tensor parallelism", world_size())  # fmt: skip
        return ShardedGenerator(
            HFGenerator.from_pretrained(
                model_dir, batch_size=batch_size, dtype=dtype, seed=seed, input_template=input_template,
                trust_remote_code=trust_remote_code,
            )
        )
    if resolve_backend(backend) == "vllm":
        return VLLMGenerator(
            model_dir,
            dtype=dtype,
            seed=seed,
            input_template=input_template,
            tensor_parallel_size=tensor_parallel(model_dir),
            trust_remote_code=trust_remote_code,
        )
    return HFGenerator.from_pretrained(
        model_dir, batch_size=batch_size, dtype=dtype, seed=seed, input_template=input_template,
        trust_remote_code=trust_remote_code,
    )


def tensor_parallel(model_dir: Path, gpus: int | None = None) -> int:
    """vLLM's tensor-parallel size in one process: the most visible GPUs (a power of two) that split the
    model's attention heads evenly — vLLM shards heads across GPUs and refuses sizes that do not divide
    them (key/value heads may instead be replicated, when the size is a multiple of theirs)."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config.get("num_attention_heads", 1)
    kv_heads = config.get("num_key_value_heads") or heads
    size = 1 << (max(gpus, 1).bit_length() - 1)
    while size > 1 and (heads % size or (kv_heads % size and size % kv_heads)):
        size //= 2
    return size
