"""safealign.openrlhf.engine: which DeepSpeed checkpoint a killed stage resumes from."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from safealign.openrlhf.engine import complete_checkpoint, resumable_tag


def save_checkpoint(ckpt_dir: Path, step: int, cut_optimizer_short: bool = False) -> Path:
    """The two files DeepSpeed's torch checkpoint engine writes for one rank, optionally with the second
    truncated as a SIGKILL during its write leaves it."""
    folder = ckpt_dir / f"global_step{step}"
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(64)}}, folder / "mp_rank_00_model_states.pt")
    optimizer = folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"m": torch.zeros(4096)}}, optimizer)
    if cut_optimizer_short:
        optimizer.write_bytes(optimizer.read_bytes()[:1000])
    return folder


def test_latest_names_the_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 2)
    save_checkpoint(tmp_path, 3)
    (tmp_path / "latest").write_text("global_step2")
    assert resumable_tag(tmp_path) == "global_step2"


def test_no_latest_starts_fresh(tmp_path):
    save_checkpoint(tmp_path, 2)
    assert resumable_tag(tmp_path) is None


def test_an_emptied_latest_takes_the_newest_complete_checkpoint(tmp_path, caplog):
    """Seen in CI: the newest folder's optimizer states were cut short by the kill; resuming from it
    failed with `EOFError: Ran out of input` from inside DeepSpeed."""
    save_checkpoint(tmp_path, 2)
    save_checkpoint(tmp_path, 3, cut_optimizer_short=True)
    (tmp_path / "latest").write_text("")
    with caplog.at_level(logging.WARNING, logger="safealign"):
        assert resumable_tag(tmp_path) == "global_step2"
    assert "newest complete one" in caplog.text


def test_nothing_complete_starts_fresh(tmp_path):
    save_checkpoint(tmp_path, 3, cut_optimizer_short=True)
    (tmp_path / "global_step4").mkdir()  # the kill came before any state was written
    (tmp_path / "latest").write_text("")
    assert resumable_tag(tmp_path) is None


def test_a_checkpoint_is_complete_with_both_states_whole(tmp_path):
    assert complete_checkpoint(save_checkpoint(tmp_path, 1))
    assert not complete_checkpoint(save_checkpoint(tmp_path, 2, cut_optimizer_short=True))
    lone_model = save_checkpoint(tmp_path, 3)
    next(lone_model.glob("*optim_states.pt")).unlink()
    assert not complete_checkpoint(lone_model)
