"""What produced cached reference log-probs, so the align stage never trains on another model's numbers.

The rm stage can store the reference policy's summed response log-probs with every scored row, which
spares align the reference forward. Those numbers are only right for the same reference weights, the
same tokenization (tokenizer and chat template), the same truncation (`data.max_len`) and the same
prompt template. Each row therefore carries `ref_logps_provenance`; align recomputes what it would
use and refuses any difference with one line naming both sides. Models and tokenizers are compared by
fingerprint (paths may move between machines; the path is kept only to be shown).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safealign.core.errors import SafeAlignError
from safealign.domain.data import PreferenceRow

#: Bytes read from each end of every weight file for the model fingerprint.
_EDGE = 1 << 20

#: Provenance keys that must match; `reference` (the path) is shown, not compared.
COMPARED = ("reference_fingerprint", "tokenizer_fingerprint", "max_len", "input_template")


def model_fingerprint(model_dir: Path) -> str:
    """Hash of `config.json` and every weight file's name, size, first and last MiB: different weights
    differ there (a full hash of a 14 GB checkpoint would cost a minute for nothing more)."""
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for path in sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_EDGE))
            handle.seek(max(0, size - _EDGE))
            digest.update(handle.read(_EDGE))
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, special tokens and chat template: what decides the token ids of a row.
    The pad token is left out: it never reaches a log-prob, and OpenRLHF sets it to EOS when missing."""
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items()) if k != "pad_token"}
    state = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": special,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def reference_provenance(reference_dir: Path, tokenizer, max_len: int, input_template: str | None) -> dict[str, Any]:
    """The provenance of log-probs computed now by `reference_dir` on rows tokenized by `tokenizer`."""
    return {
        "reference": str(reference_dir),
        "reference_fingerprint": model_fingerprint(reference_dir),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "max_len": max_len,
        "input_template": input_template,
    }


def check_same_tokenizer(policy_tokenizer, reference_dir: Path, trust_remote_code: bool = False) -> None:
    """DPO compares policy and reference on the same token ids: the reference's own tokenizer must be
    the policy's (both are then run on the policy's tokenization)."""
    from transformers import AutoTokenizer

    theirs = tokenizer_fingerprint(AutoTokenizer.from_pretrained(reference_dir, trust_remote_code=trust_remote_code))
    ours = tokenizer_fingerprint(policy_tokenizer)
    if theirs != ours:
        raise SafeAlignError(
            f"model.reference ({reference_dir}) tokenizes differently from model.policy (tokenizer {theirs} vs "
            f"{ours}): DPO needs both on the same token ids; use a reference of the policy's family"
        )


def check_cached_reference(rows: list[PreferenceRow], expected: dict[str, Any]) -> None:
    """Refuse cached reference log-probs that this run would not have computed (one line, both sides)."""
    for row in rows:
        given = row.ref_logps_provenance
        if given is None:
            raise SafeAlignError(
                f"{row.source or 'a row'}: ref_logps_0/1 come without ref_logps_provenance, so nothing says which "
                "model, tokenizer and max_len produced them; let the rm stage compute them "
                "(rm.reference_logps: true) or drop those fields"
            )
        for key in COMPARED:
            if given.get(key) != expected[key]:
                shown = {"reference_fingerprint": "reference"}.get(key)
                theirs = f"{given.get(key)!r}" + (f" ({given.get(shown)})" if shown else "")
                ours = f"{expected[key]!r}" + (f" ({expected[shown]})" if shown else "")
                raise SafeAlignError(
                    f"{row.source or 'a row'}: cached reference log-probs were computed with {key}={theirs}, "
                    f"this run uses {key}={ours}; re-run the rm stage to recompute them, or drop "
                    "ref_logps_0/1 from the data to use the reference model"
                )
