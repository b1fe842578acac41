"""Generation backends on a tiny random model (no vLLM here: it needs a GPU)."""

from __future__ import annotations

import json

import pytest
from support import pku_rows

from safealign.domain.generation import GenerationRequest, HFGenerator, make_generator, vllm_usable
from safealign.models.resolve import build_random
from safealign.recipe import RandomModel


@pytest.fixture(scope="module")
def tiny_model(tokenizer_dir, tmp_path_factory):
    """A random model whose special tokens (pad, eos, bos) have zero embeddings (tied to the LM head),
    so greedy decoding produces visible text instead of stopping or padding at once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = build_random(
        RandomModel(
            tokenizer=str(tokenizer_dir),
            config={"hidden_size": 48, "intermediate_size": 96, "initializer_range": 0.5},
            seed=3,
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.all_special_ids] = 0.0
    out = tmp_path_factory.mktemp("talkative")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_batched_greedy_equals_one_by_one(tiny_model):
    prompts = [r["prompt"] for r in pku_rows(7)] + ["Hi"]  # very different lengths: real left padding
    requests = [GenerationRequest.single_turn(p, max_new_tokens=12) for p in prompts]
    batched = HFGenerator.from_pretrained(tiny_model, batch_size=4).generate(requests)
    single = HFGenerator.from_pretrained(tiny_model, batch_size=1)
    one_by_one = single.generate(requests)
    assert batched == one_by_one
    assert all(len(a) > 5 for a in batched), batched  # real text, so the comparison means something
    assert single.stats.answers == len(requests) and single.stats.answers_per_second > 0


def test_requests_keep_their_order_across_sampling_groups(tiny_model):
    generator = HFGenerator.from_pretrained(tiny_model, batch_size=3)
    greedy = [GenerationRequest.single_turn(r["prompt"], max_new_tokens=6) for r in pku_rows(4)]
    mixed = [
        greedy[0],
        GenerationRequest.single_turn("x", max_new_tokens=6, temperature=0.7),
        greedy[1],
        greedy[2],
        greedy[3],
    ]
    out = generator.generate(mixed)
    assert [out[0], out[2], out[3], out[4]] == generator.generate(greedy)


def test_each_sampled_batch_draws_its_own_stream_and_the_same_requests_the_same_answers(tiny_model):
    # six copies of one prompt, one per batch: reseeding every batch with the generator's seed (as before
    # `batch_seed`) answered all six alike, so a mean over answers moved as one answer
    requests = [GenerationRequest.single_turn("Tell me a story", max_new_tokens=10, temperature=1.0)] * 6
    answers = HFGenerator.from_pretrained(tiny_model, batch_size=1, seed=5).generate(requests)
    assert len(set(answers)) > 1, answers
    # ...while the same requests at the same seed draw the same streams: a rerun reproduces its answers and
    # two models asked the same prompts sample with common random numbers
    assert HFGenerator.from_pretrained(tiny_model, batch_size=1, seed=5).generate(requests) == answers
    assert HFGenerator.from_pretrained(tiny_model, batch_size=1, seed=6).generate(requests) != answers


def test_auto_backend_is_hf_without_a_gpu(tiny_model):
    assert not vllm_usable()
    assert isinstance(make_generator(tiny_model), HFGenerator)


def test_vllm_gets_token_ids_without_a_bos_for_an_input_template(monkeypatch, tokenizer_dir):
    """vLLM cannot run here (no GPU): a stand-in `vllm` module records what VLLMGenerator hands it. With
    data.input_template the prompt goes as token ids tokenized without special tokens, as the HF path and
    OpenRLHF's datasets tokenize it (vLLM's own text path would prepend a BOS)."""
    import sys
    import types

    from transformers import AutoTokenizer

    from safealign.domain.generation import VLLMGenerator

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_bos_token = True  # a tokenizer that would add a BOS if asked to add special tokens
    calls = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def get_tokenizer(self):
            return tokenizer

        def generate(self, prompts, params, use_tqdm=True):
            calls["prompts"] = prompts
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=" ok ")]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda: (80 * 2**30, 80 * 2**30))  # no GPU here

    generator = VLLMGenerator("model-dir", dtype="bf16", input_template="Human: {}\nAssistant: ")
    assert generator.generate([GenerationRequest.single_turn("Hi there")]) == ["ok"]
    (prompt,) = calls["prompts"]
    expected = tokenizer("Human: Hi there\nAssistant: ", add_special_tokens=False)["input_ids"]
    assert prompt == {"prompt_token_ids": expected}
    assert calls["engine"]["dtype"] == "bfloat16"


def test_a_vllm_engine_is_shut_down_and_its_memory_awaited_before_the_next_model(monkeypatch):
    """`del` + gc left a vLLM engine's worker processes holding the GPUs while the next model loaded.
    close() shuts the engine core down, then vLLM's process groups, and waits until the GPU's free
    memory is back (a stand-in `vllm` and a faked `torch.cuda.mem_get_info`: no GPU here)."""
    import sys
    import types

    from safealign.domain.generation import VLLMGenerator

    order: list[str] = []
    engine_core = types.SimpleNamespace(shutdown=lambda: order.append("engine_core.shutdown"))

    class FakeLLM:
        def __init__(self, **kwargs):
            self.llm_engine = types.SimpleNamespace(engine_core=engine_core)

    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.destroy_model_parallel = lambda: order.append("destroy_model_parallel")
    parallel_state.destroy_distributed_environment = lambda: order.append("destroy_distributed_environment")
    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    for name, module in {"vllm": fake, "vllm.distributed": types.ModuleType("vllm.distributed"),
                         "vllm.distributed.parallel_state": parallel_state}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    free = iter([80, 12, 12, 30, 79.5])  # GiB free: before the engine, then polls after its shutdown
    polls: list[float] = []

    def mem_get_info():
        polls.append(next(free))
        return polls[-1] * 2**30, 80 * 2**30

    monkeypatch.setattr("torch.cuda.mem_get_info", mem_get_info)
    monkeypatch.setattr("safealign.domain.generation.time.sleep", lambda seconds: None)

    generator = VLLMGenerator("model-dir", dtype="bf16")
    generator.close()
    assert order == ["engine_core.shutdown", "destroy_model_parallel", "destroy_distributed_environment"]
    assert polls == [80, 12, 12, 30, 79.5]  # waited until within 1 GiB of the memory free before the engine
    assert generator.llm is None
    generator.close()  # a second close is a no-op
    assert len(order) == 3


SHARD_SCRIPT = """
import json, torch.distributed as dist
from safealign.domain.generation import GenerationRequest, GenerationStats, ShardedGenerator
from safealign.core.process import init_process_group, leave_process_group

class Echo:  # stands in for a model: answers with the prompt, records what it was asked
    def __init__(self):
        self.stats, self.seen = GenerationStats(backend="echo"), []
    def generate(self, requests):
        self.seen += [r.messages[0][1] for r in requests]
        self.stats.new_tokens += len(requests)
        return [r.messages[0][1].upper() for r in requests]

init_process_group()
inner = Echo()
sharded = ShardedGenerator(inner)
answers = sharded.generate([GenerationRequest.single_turn(f"q{i}") for i in range(5)])
with open(f"rank{dist.get_rank()}.json", "w") as out:
    json.dump({"seen": inner.seen, "answers": answers, "answers_n": sharded.stats.answers,
               "tokens": sharded.stats.new_tokens, "backend": sharded.stats.backend}, out)
leave_process_group()
"""


def test_sharded_generation_splits_requests_over_ranks_and_gathers_them_in_order(tmp_path):
    """Under torchrun (2 ranks, gloo) each rank's generator is asked every other request — equal shares:
    rank 1 repeats q0 and drops its answer — and every rank gets all answers back in request order, with
    the world's counts (6 requests generated for 5 answers)."""
    from support import torchrun

    (tmp_path / "shard.py").write_text(SHARD_SCRIPT)
    result = torchrun(str(tmp_path / "shard.py"), cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["seen"] == ["q0", "q2", "q4"] and ranks[1]["seen"] == ["q1", "q3", "q0"]
    for r in ranks:
        assert r["answers"] == ["Q0", "Q1", "Q2", "Q3", "Q4"]
        assert (r["answers_n"], r["tokens"], r["backend"]) == (5, 6, "echo × 2 ranks")


@pytest.mark.parametrize(
    "gpus, heads, kv_heads, expected",
    [(8, 32, 8, 8), (8, 32, 2, 8), (6, 32, 8, 4), (8, 4, 2, 4), (8, 12, 4, 4), (0, 32, 8, 1), (8, 9, 3, 1)],
)
def test_vllm_tensor_parallel_size_splits_the_heads(tmp_path, gpus, heads, kv_heads, expected):
    """Mistral-7B (32 heads, 8 KV) takes all 8 GPUs; a 4-head model takes 4; 6 GPUs use 4; no GPU: 1."""
    from safealign.domain.generation import tensor_parallel

    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv_heads}))
    assert tensor_parallel(tmp_path, gpus) == expected
