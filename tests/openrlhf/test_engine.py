"""safealign.openrlhf.engine: which DeepSpeed checkpoint a killed stage resumes from."""

from __future__ import annotations

import gc
import logging
import os
import weakref
from pathlib import Path

import pytest
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


def test_an_engine_used_for_inference_is_freed_afterwards(tokenizer_dir, tmp_path):
    """DeepSpeed's hooks keep a prepared engine and its weights reachable after `del` and a full
    collection (measured with SmolLM2-135M: RSS +0.12 GB per model scored in one process; flat with
    `release`). Eval scores one policy after another in one process, so each must really go."""
    from support import PKU, TINY_TRAINER, tiny_policy

    from safealign.models.resolve import resolve_model
    from safealign.openrlhf import engine
    from safealign.recipe import Recipe
    from safealign.workflows.inference import scoring_settings

    recipe = Recipe.model_validate({
        "name": "release", "model": tiny_policy(tokenizer_dir), "data": {"train": [{"path": str(PKU)}], "max_len": 64},
        "align": TINY_TRAINER, "logging": {"tensorboard": False},
    })  # fmt: skip
    policy = resolve_model(recipe.model.policy)
    settings = scoring_settings(recipe, "dpo", policy, tmp_path)
    strategy = engine.make_strategy(settings)
    actor = engine.load_actor(policy, settings, strategy, trainable=False)
    with engine.prepared_for_inference(strategy, actor) as prepared:
        ds_engine = weakref.ref(prepared.model)
        weight = weakref.ref(next(prepared.model.module.parameters()))
        assert not prepared.model.module.training  # forward passes only (no dropout)
    del actor, prepared
    gc.collect()
    assert ds_engine() is None and weight() is None


class PortTakenOnce:
    """A strategy whose first process-group start finds its port taken, as another process can bind a
    one-process world's chosen port before the group listens on it (seen in a busy full test run)."""

    world_size = 1

    def __init__(self, failures: int = 1):
        self.failures, self.ports = failures, []

    def setup_distributed(self):
        self.ports.append(os.environ["MASTER_PORT"])
        if len(self.ports) <= self.failures:
            raise torch.distributed.DistNetworkError("The server socket has failed to listen ... EADDRINUSE")


def start(monkeypatch, strategy, launcher: bool = False, inherited_marker: str | None = None):
    from types import SimpleNamespace as NS

    from safealign.openrlhf import engine

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SAFEALIGN_OWN_MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so what make_strategy sets is undone after the test
        monkeypatch.delenv(name)
    if launcher:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("MASTER_PORT", "29500")
    if inherited_marker:
        monkeypatch.setenv("SAFEALIGN_OWN_MASTER_PORT", inherited_marker)
    monkeypatch.setattr(engine, "get_strategy", lambda args: strategy)
    return engine.make_strategy(NS(train=NS(batch_size=4, micro_batch_size=2)))


def test_a_taken_port_of_a_one_process_world_is_picked_again(monkeypatch):
    strategy = PortTakenOnce()
    assert start(monkeypatch, strategy) is strategy
    assert len(strategy.ports) == 2 and strategy.ports[0] != strategy.ports[1]


@pytest.mark.parametrize("inherited", [False, True])
def test_a_launchers_port_is_not_changed(monkeypatch, inherited):
    """Under torchrun every rank must meet on the launcher's port: a taken one is the launcher's error —
    also in a process that inherited a one-process world's marker from the one that launched it."""
    with pytest.raises(torch.distributed.DistNetworkError):
        start(monkeypatch, PortTakenOnce(), launcher=True, inherited_marker="40000" if inherited else None)


def test_a_port_that_stays_taken_is_reported(monkeypatch):
    strategy = PortTakenOnce(failures=5)
    with pytest.raises(torch.distributed.DistNetworkError):
        start(monkeypatch, strategy)
    assert len(strategy.ports) == 3
