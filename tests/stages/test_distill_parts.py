"""The distill stage's pieces that need no training: best-of-n choice, candidate pairing, prompt sets,
the eval-prompt guard, prompt formatting without a chat template, and the report's teacher/student table."""

from __future__ import annotations

import json

import pytest
from support import PKU, pku_rows, write_jsonl
from transformers import AutoTokenizer

from safealign.core.errors import SafeAlignError
from safealign.domain.data import load_prompt_file, unique_prompts
from safealign.domain.generation import GenerationRequest, format_prompt
from safealign.eval.report import teacher_vs_student
from safealign.eval.safety import DEFAULT_PATH
from safealign.recipe import validate_recipe
from safealign.stages.distill import _candidate_pairs, _unpair, pick_answer
from safealign.workflows.heldout import check_not_eval_prompts


@pytest.mark.parametrize(
    "rewards, costs, expected",
    [
        ([0.1, 0.9, 0.5], [-1.0, 2.0, -0.5], (2, True)),  # the best reward (0.9) is unsafe: best safe is 0.5
        ([0.3, 0.2, 0.1], [-1.0, -1.0, -1.0], (0, True)),  # all safe: plain best-of-n
        ([0.3, 0.2, 0.1], [3.0, 0.5, 1.0], (1, False)),  # none safe: the least costly
        ([0.4, 0.4], [0.0, -2.0], (0, True)),  # cost 0 counts as safe (Safe RLHF's cost ≤ 0); ties: first
    ],
)
def test_pick_answer_by_hand(rewards, costs, expected):
    assert pick_answer(rewards, costs) == expected


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_candidates_pair_up_and_come_back_in_order(n):
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    candidates = [[f"a{i}.{j}" for j in range(n)] for i in range(3)]
    rows = _candidate_pairs(prompts, candidates)
    assert len(rows) == 3 * ((n + 1) // 2)
    # score each response by its text, then undo the pairing: every answer gets its own value back
    value = {f"a{i}.{j}": 10 * i + j for i in range(3) for j in range(n)}
    scores = [(value[r.response_0], value[r.response_1]) for r in rows]
    assert _unpair(scores, n) == [[10 * i + j for j in range(n)] for i in range(3)]
    assert all(r.prompt == prompts[int(r.response_0[1])] for r in rows)  # a pair never mixes prompts


def test_prompt_files_and_dedup(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}, {"prompt": " a "}]
    )
    prompts = load_prompt_file(path)
    assert prompts[1] == [{"role": "user", "content": "b"}]
    assert unique_prompts(prompts) == prompts[:2]  # " a " and "a" are one prompt
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(SafeAlignError, match=r"bad.jsonl:2: missing field 'prompt'"):
        load_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SafeAlignError, match="no prompts"):
        load_prompt_file(tmp_path / "empty.jsonl")


def test_eval_prompts_never_reach_training():
    recipe = validate_recipe({"name": "t", "model": {"policy": "x"}, "data": {"train": [{"path": str(PKU)}]}, "stages": ["rm"]})
    training = [[{"role": "user", "content": r["prompt"]}] for r in pku_rows(5)]
    check_not_eval_prompts(recipe, training, "data.train")  # the shipped data is clean
    leaked = json.loads(DEFAULT_PATH.read_text().splitlines()[123])["prompt"]
    mt_bench = json.loads((DEFAULT_PATH.parents[1] / "mt-bench" / "question.jsonl").read_text().splitlines()[0])
    for prompt, eval_set in ((leaked, "BeaverTails-Evaluation"), (mt_bench["turns"][0], "MT-Bench")):
        poisoned = training + [[{"role": "user", "content": f"  {prompt}\n"}]]
        with pytest.raises(SafeAlignError) as info:
            check_not_eval_prompts(recipe, poisoned, "distill.prompts", sources=[""] * 5 + ["p.jsonl:6"])
        assert f"distill.prompts: 1 prompt(s) are {eval_set} evaluation prompts (first: p.jsonl:6" in str(info.value)
    # the same conversation: its first turn re-cased and unpunctuated, opening a longer conversation
    opening = "".join(ch for ch in leaked.upper() if ch.isalnum() or ch == " ")
    tree = [{"role": "user", "content": opening}, {"role": "assistant", "content": "No."}, {"role": "user", "content": "Why?"}]
    with pytest.raises(SafeAlignError, match=r"data.train: 1 prompt\(s\) are BeaverTails-Evaluation evaluation prompts"):
        check_not_eval_prompts(recipe, training + [tree], "data.train")


def test_prompts_without_a_chat_template_use_the_input_template(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    one = GenerationRequest.single_turn("Hi there")
    assert format_prompt(tokenizer, one, "Human: {}\nAssistant: ") == "Human: Hi there\nAssistant: "
    two = GenerationRequest(messages=(("user", "a"), ("assistant", "b"), ("user", "c")))
    assert format_prompt(None, two, "Q: {} A:") == "Q: user: a\nassistant: b\nuser: c A:"
    assert format_prompt(tokenizer, one, None).endswith("<|im_start|>assistant\n")  # the chat template
    tokenizer.chat_template = None
    with pytest.raises(SafeAlignError, match="no chat template: set data.input_template"):
        format_prompt(tokenizer, one, None)


def test_teacher_vs_student_table_by_hand():
    def model(params, safe, win, speed):
        return {
            "parameters": params,
            "safety": {"refusal": {"overall": {"rate": safe}}},
            "helpfulness": {"rm_win_rate_vs_base": win},
            "generation": {"answers_per_second": speed},
        }

    results = {"models": {"base": model(200e6, 0.2, 0.5, 1.0), "aligned": model(200e6, 0.8, 0.5, 1.0),
                          "student": model(100e6, 0.6, 0.4, 2.5)}}  # fmt: skip
    header, rows = teacher_vs_student(results, ["refusal"])
    assert header[1] == "teacher (aligned)"
    assert rows[0] == ["parameters (M)", "200.0", "100.0", "0.50×"]
    assert rows[1] == ["safety (refusal)", "80.0%", "60.0%", "0.75×"]
    assert rows[2] == ["helpfulness: Helpful-RM win rate vs base (proxy)", "50.0%", "40.0%", "0.80×"]
    assert rows[3] == ["answers/s", "1.00", "2.50", "2.50×"]
    del results["models"]["student"]
    assert teacher_vs_student(results, ["refusal"]) is None
