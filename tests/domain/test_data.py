"""Adapters to one row shape, validation errors that name the row, and prompt-level splits."""

from __future__ import annotations

import json

import pytest
from support import HH, PKU, pku_rows, write_jsonl

from safealign.core.errors import SafeAlignError
from safealign.domain.data import RowError, hold_out_prompts, load_rows, prompt_identity, split_by_prompt


def test_pku_sample_loads_with_both_labels():
    rows = load_rows(PKU, "pku_saferlhf")
    assert len(rows) == 225
    # Facts from data/pku-saferlhf-sample/README.md: better ≠ safer in 46 rows; better = 1 in 135; safer = 1 in 143.
    assert sum(r.better_response_id != r.safer_response_id for r in rows) == 46
    assert sum(r.better_response_id == 1 for r in rows) == 135
    assert sum(r.safer_response_id == 1 for r in rows) == 143
    assert rows[0].prompt == [{"role": "user", "content": pku_rows(1)[0]["prompt"]}]
    assert rows[0].delta_h is None and rows[0].source.endswith(":1")


def test_hh_rlhf_rows_become_safe_only_dialogues(caplog, monkeypatch):
    monkeypatch.setattr("safealign.domain.data._REPORTED_SKIPS", set())  # whatever other tests read before
    rows = load_rows(HH, "hh_rlhf", dimension="safe")
    assert len(rows) == 299  # line 87's chosen answer is empty: skipped and reported
    assert "skipped 1 row(s) without a usable pair" in caplog.text and "jsonl:87" in caplog.text
    caplog.clear()
    assert load_rows(HH, "hh_rlhf", dimension="safe") == rows and "skipped" not in caplog.text  # said once
    assert all(r.better_response_id == -1 and r.safer_response_id == 0 for r in rows)
    first = rows[0]
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert first.response_0 != first.response_1


def test_pairs_label_the_declared_dimension(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    (row,) = load_rows(path, "pairs", dimension="helpful")
    assert (row.response_0, row.better_response_id, row.safer_response_id) == ("good", 0, -1)
    with pytest.raises(SafeAlignError, match="dimension"):
        load_rows(path, "pairs")


def pku_variant(tmp_path, **changes):
    row = {**pku_rows(1)[0], **changes}
    return write_jsonl(tmp_path / "bad.jsonl", [pku_rows(2)[1], row])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"safer_response_id": 2}, r"bad.jsonl:2: safer_response_id must be 0, 1 or -1 \(no label\), got 2"),
        ({"better_response_id": True}, "better_response_id must be 0, 1 or -1"),
        ({"better_response_id": None}, "missing field 'better_response_id'"),
        ({"response_1": 3}, "response_1 must be a string"),
        ({"delta_h": "big"}, "delta_h must be a number"),
        ({"is_response_0_safe": "yes"}, "is_response_0_safe must be true or false"),
        ({"ref_logps_provenance": "rm"}, "bad.jsonl:2: ref_logps_provenance must be an object"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, changes, message):
    with pytest.raises(RowError, match=message):
        load_rows(pku_variant(tmp_path, **changes), "pku_saferlhf")


def test_nan_margin_is_an_error(tmp_path):
    path = tmp_path / "nan.jsonl"
    rows = pku_rows(2)
    rows[1]["delta_s"] = float("nan")  # json writes NaN, which Python's reader accepts
    write_jsonl(path, rows)
    assert "NaN" in path.read_text()
    with pytest.raises(RowError, match=r"nan.jsonl:2: delta_s is nan \(NaN/inf\)"):
        load_rows(path, "pku_saferlhf")


def test_half_scored_data_is_an_error(tmp_path):
    rows = pku_rows(3)
    rows[0]["cost_0"], rows[0]["cost_1"] = 1.0, -1.0
    with pytest.raises(RowError, match="cost_0 is missing here but present in other rows"):
        load_rows(write_jsonl(tmp_path / "half.jsonl", rows), "pku_saferlhf")


def test_empty_and_malformed_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SafeAlignError, match="no usable rows"):
        load_rows(tmp_path / "empty.jsonl", "pku_saferlhf")
    only_empty = write_jsonl(tmp_path / "blank.jsonl", [{**pku_rows(1)[0], "response_0": "  "}])
    with pytest.raises(SafeAlignError, match="no usable rows"):
        load_rows(only_empty, "pku_saferlhf")
    (tmp_path / "broken.jsonl").write_text(json.dumps(pku_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(RowError, match="broken.jsonl:2: not valid JSON"):
        load_rows(tmp_path / "broken.jsonl", "pku_saferlhf")
    with pytest.raises(SafeAlignError, match="not found"):
        load_rows(tmp_path / "missing.jsonl", "pku_saferlhf")


def test_split_is_deterministic_and_keeps_prompts_on_one_side():
    rows = load_rows(PKU, "pku_saferlhf")
    train, held_out = split_by_prompt(rows, 0.2, seed=7)
    again_train, again_held_out = split_by_prompt(rows, 0.2, seed=7)
    assert [r.source for r in held_out] == [r.source for r in again_held_out]
    assert len(train) + len(held_out) == len(rows)
    assert 0.1 < len(held_out) / len(rows) < 0.3
    assert not {prompt_identity(r.prompt) for r in train} & {prompt_identity(r.prompt) for r in held_out}
    assert split_by_prompt(rows, 0.0, seed=7) == (rows, [])


def test_the_cost_pool_is_a_fixed_set_of_prompts_whose_every_pair_leaves_training():
    rows = load_rows(PKU, "pku_saferlhf")
    rows = rows + rows[:5]  # a prompt may have several pairs: all of them go with it
    pool, rest = hold_out_prompts(rows, 8, seed=7)
    assert len(pool) == len({prompt_identity(p) for p in pool}) == 8
    pooled = {prompt_identity(p) for p in pool}
    assert not pooled & {prompt_identity(r.prompt) for r in rest}
    assert len(rest) == sum(prompt_identity(r.prompt) not in pooled for r in rows)
    shuffled_pool, _ = hold_out_prompts(list(reversed(rows)), 8, seed=7)
    assert shuffled_pool == pool  # chosen by prompt and seed, not by file order
    assert hold_out_prompts(rows, 8, seed=8)[0] != pool
    assert hold_out_prompts(rows, 0, seed=7) == ([], rows)
    with pytest.raises(SafeAlignError, match="holding out 500 prompts leaves no training rows"):
        hold_out_prompts(rows, 500, seed=7)


def test_training_subsets_are_nested_deterministic_and_in_file_order():
    """align.max_pairs: the subset for 100 pairs is inside the one for 200 (a learning curve on one base),
    the same whatever else varies, in the rows' own order."""
    from safealign.domain.data import subset_by_prompt

    rows = load_rows(PKU, "pku_saferlhf")
    small, large = subset_by_prompt(rows, 20, seed=7), subset_by_prompt(rows, 60, seed=7)
    assert len(small) == 20 and len(large) == 60
    assert {id(r) for r in small} <= {id(r) for r in large}
    assert small == subset_by_prompt(list(rows), 20, seed=7)
    positions = [rows.index(r) for r in large]
    assert positions == sorted(positions) and positions != list(range(60))  # spread over the file, not its head
    assert subset_by_prompt(rows, 20, seed=8) != small


def test_a_training_subset_takes_the_pairs_with_both_labels_first():
    """align.max_pairs on mixed data: every pair labelled for helpfulness is in before a harmless-only one."""
    from safealign.domain.data import subset_by_prompt

    pku, hh = load_rows(PKU, "pku_saferlhf")[:10], load_rows(HH, "hh_rlhf", dimension="safe")[:30]
    mixed = hh[:15] + pku + hh[15:]
    subset = subset_by_prompt(mixed, 14, seed=7)
    assert sum(r.better_response_id >= 0 for r in subset) == 10  # all of PKU's, where 14/40 of random rows gives 3-4
    assert subset == [r for r in mixed if any(r is s for s in subset)]  # in the rows' own order


def test_the_rm_split_keeps_a_conversation_on_one_side():
    """Pairs of one conversation (a prompt extending another, the same opening in other capitals) are
    held out together or not at all, for any seed."""
    from safealign.domain.data import PreferenceRow, held_out_indices

    def row(*turns: str) -> PreferenceRow:
        prompt = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        return PreferenceRow(prompt=prompt, response_0="a", response_1="b", safer_response_id=0)

    family = [row("How do I pick a lock?"), row("how do i pick a LOCK"), row("How do I pick a lock?", "No.", "Please?")]
    others = [row(f"Question number {i}?") for i in range(40)]
    for seed in range(20):
        held = held_out_indices(family + others, 0.5, seed)
        assert {0, 1, 2} <= held or not {0, 1, 2} & held
        assert 0 < len(held & set(range(3, 43))) < 40  # the others do split


def test_flipped_labels_reverse_both_preferences_and_negate_the_margins():
    from safealign.domain.data import PreferenceRow, relabel

    rows = [
        PreferenceRow(prompt=[{"role": "user", "content": "q"}], response_0="a", response_1="b", better_response_id=0,
                      safer_response_id=1, delta_h=0.5, delta_s=-0.25, cost_0=1.0, cost_1=-1.0, ref_logps_0=-3.0),
        PreferenceRow(prompt=[{"role": "user", "content": "r"}], response_0="c", response_1="d", safer_response_id=0),
    ]  # fmt: skip
    flipped = relabel(rows, "flipped", seed=0)
    assert (flipped[0].better_response_id, flipped[0].safer_response_id) == (1, 0)
    assert (flipped[0].delta_h, flipped[0].delta_s) == (-0.5, 0.25)
    assert (flipped[0].cost_0, flipped[0].cost_1, flipped[0].ref_logps_0) == (1.0, -1.0, -3.0)  # per response: kept
    assert (flipped[1].better_response_id, flipped[1].safer_response_id, flipped[1].delta_s) == (-1, 1, None)
    assert relabel(rows, "given", seed=0) is rows and rows[0].better_response_id == 0  # the input is untouched


def test_shuffled_labels_flip_about_half_the_pairs_the_same_way_every_time():
    from safealign.domain.data import relabel

    rows = [row_of(i) for i in range(400)]
    once, again, other_seed = (relabel(rows, "shuffled", seed) for seed in (1, 1, 2))
    flipped = [a.safer_response_id != r.safer_response_id for a, r in zip(once, rows)]
    assert 160 < sum(flipped) < 240  # a fair coin per pair
    assert [a.safer_response_id for a in once] == [a.safer_response_id for a in again]  # seeded
    assert [a.safer_response_id for a in once] != [a.safer_response_id for a in other_seed]
    # whatever the coin said, a pair's labels move together: better and safer are flipped as one
    assert all((a.better_response_id != r.better_response_id) == f for a, r, f in zip(once, rows, flipped))


def row_of(i: int):
    from safealign.domain.data import PreferenceRow

    return PreferenceRow(prompt=[{"role": "user", "content": f"question {i}"}], response_0=f"a{i}", response_1=f"b{i}",
                         better_response_id=i % 2, safer_response_id=0)  # fmt: skip
