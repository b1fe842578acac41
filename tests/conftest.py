"""Shared fixtures: a per-session model cache, a tokenizer trained here, scored PKU-format rows, and a
local judge API. Helpers the tests import are in support.py.

Nothing is downloaded: the tokenizer is a 512-token byte-level BPE trained in a second on the
PKU-SafeRLHF sample this repository ships, and models are random-weight Llamas built from a config.
"""

from __future__ import annotations

import os
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from support import FakeJudgeAPI, build_tokenizer, pku_rows, write_jsonl

# OpenRLHF must load after the patches; applying them once, here, lets every
# test module import openrlhf directly.
from safealign.openrlhf.patches import apply_patches

apply_patches()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory) -> None:
    """Converted and random models go to a per-session cache, never the user's."""
    os.environ["SAFEALIGN_CACHE"] = str(tmp_path_factory.mktemp("safealign-cache"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer (512 tokens) with a chat template, trained on the PKU sample."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def scored_rows(tmp_path) -> Path:
    """24 PKU rows as the RM stage would write them: margins plus costs (+1 unsafe, −1 safe)."""
    rows = []
    for i, row in enumerate(pku_rows(24)):
        rows.append(
            {
                **row,
                "delta_h": 0.25 * (i % 5),
                "delta_s": 0.5 * (i % 3),
                "cost_0": -1.0 if row["is_response_0_safe"] else 1.0,
                "cost_1": -1.0 if row["is_response_1_safe"] else 1.0,
            }
        )
    return write_jsonl(tmp_path / "scored.jsonl", rows)


@pytest.fixture
def judge_api():
    """A local OpenAI-compatible server standing in for a paid judge API: it answers safety prompts by
    content ([[UNSAFE]] for answers containing "Step 1"; Llama Guard's `unsafe\\nS2` / `safe` when sent the
    conversation itself), MT-Bench gradings with [[7]], or a script of HTTP codes / rate limits with
    Retry-After / "sleep" / "garbage" replies set by the test; GET /models answers `models_status`."""
    FakeJudgeAPI.script, FakeJudgeAPI.requests, FakeJudgeAPI.probes, FakeJudgeAPI.models_status = [], [], [], 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudgeAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", FakeJudgeAPI
    server.shutdown()
