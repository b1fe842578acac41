"""Preference data: adapters to one row shape, validation with errors that name the row, and splits.

Every source becomes a list of `PreferenceRow`s: a prompt (chat messages), two responses, a helpful
label (`better_response_id`) and a harmless label (`safer_response_id`), each 0, 1 or −1 when the
source has no label for that dimension, plus whatever the RM stage added (margins, per-response costs,
reference log-probs). Formats:

- `pku_saferlhf`: PKU-SafeRLHF rows (`prompt, response_0, response_1, better_response_id,
  safer_response_id, is_response_{0,1}_safe`), optionally with `delta_h, delta_s, cost_0, cost_1,
  ref_logps_0, ref_logps_1, ref_logps_provenance` (what `rm/scored.jsonl` carries).
- `pairs`: `chosen`/`rejected` responses with an optional `prompt`, labelling one declared dimension.
- `hh_rlhf`: Anthropic HH-RLHF transcripts (`\\n\\nHuman: … \\n\\nAssistant: …`); the turns before the
  final Assistant turn become the prompt messages; labels one declared dimension (harmless-base → safe).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from safealign.core.errors import SafeAlignError

log = logging.getLogger("safealign")

Format = Literal["pku_saferlhf", "pairs", "hh_rlhf"]
#: A preference dimension: which label orders a pair (`better_response_id` or `safer_response_id`).
Dimension = Literal["helpful", "safe"]
#: Dimension -> the row field that labels it.
LABEL_FIELDS: dict[str, str] = {"helpful": "better_response_id", "safe": "safer_response_id"}
Message = dict[str, str]

#: Optional numeric per-row fields, and which of them must be present for every row or none.
OPTIONAL_FLOATS = ("delta_h", "delta_s", "cost_0", "cost_1", "ref_logps_0", "ref_logps_1")


@dataclass
class PreferenceRow:
    """One response pair with both dimensions' labels (−1: no label) and optional RM-stage numbers."""

    prompt: list[Message]
    response_0: str
    response_1: str
    better_response_id: int = -1
    safer_response_id: int = -1
    is_response_0_safe: bool | None = None
    is_response_1_safe: bool | None = None
    delta_h: float | None = None
    delta_s: float | None = None
    cost_0: float | None = None
    cost_1: float | None = None
    ref_logps_0: float | None = None
    ref_logps_1: float | None = None
    #: What computed ref_logps_0/1 (safealign.models.provenance): reference, tokenizer, max_len, template.
    ref_logps_provenance: dict[str, Any] | None = None
    source: str = field(default="", compare=False)  # "file:line", for error messages

    def to_json(self) -> dict[str, Any]:
        """The row as written to a run directory (PKU-style keys, `pku_saferlhf` reads it back)."""
        row = asdict(self)
        row.pop("source")
        return {k: v for k, v in row.items() if v is not None}


class RowError(SafeAlignError):
    """A bad data row; the message starts with `file:line`."""


class SkippedRow(RowError):
    """A well-formed row that holds no usable pair — an empty answer, or HH-RLHF transcripts that differ
    before their last turn (the public files have a few of each): skipped and reported, not fatal."""


def _require(raw: dict, key: str, where: str) -> Any:
    if key not in raw or raw[key] is None:
        raise RowError(f"{where}: missing field {key!r}")
    return raw[key]


def _text(raw: dict, key: str, where: str) -> str:
    value = _require(raw, key, where)
    if not isinstance(value, str):
        raise RowError(f"{where}: {key} must be a string")
    if not value.strip():
        raise SkippedRow(f"{where}: {key} is empty")
    return value


def _label(raw: dict, key: str, where: str, allow_missing: bool) -> int:
    if allow_missing and raw.get(key) is None:
        return -1
    value = _require(raw, key, where)
    if isinstance(value, bool) or value not in (-1, 0, 1):
        raise RowError(f"{where}: {key} must be 0, 1 or -1 (no label), got {value!r}")
    return int(value)


def _finite(raw: dict, key: str, where: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(f"{where}: {key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise RowError(f"{where}: {key} is {value} (NaN/inf); re-run the rm stage or drop the row")
    return float(value)


def _safety(raw: dict, key: str, where: str) -> bool | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise RowError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _provenance(raw: dict, where: str) -> dict[str, Any] | None:
    value = raw.get("ref_logps_provenance")
    if value is not None and not isinstance(value, dict):
        raise RowError(f"{where}: ref_logps_provenance must be an object, got {value!r}")
    return value


def _scored_fields(raw: dict, where: str) -> dict[str, Any]:
    return {
        **{key: _finite(raw, key, where) for key in OPTIONAL_FLOATS},
        "ref_logps_provenance": _provenance(raw, where),
    }


def from_pku_saferlhf(raw: dict, where: str, dimension: str | None = None) -> PreferenceRow:
    """A PKU-SafeRLHF row (both labels required; −1 allowed for rows written by our own stages)."""
    return PreferenceRow(
        prompt=_prompt_messages(raw, where),
        response_0=_text(raw, "response_0", where),
        response_1=_text(raw, "response_1", where),
        better_response_id=_label(raw, "better_response_id", where, allow_missing=False),
        safer_response_id=_label(raw, "safer_response_id", where, allow_missing=False),
        is_response_0_safe=_safety(raw, "is_response_0_safe", where),
        is_response_1_safe=_safety(raw, "is_response_1_safe", where),
        source=where,
        **_scored_fields(raw, where),
    )


def _prompt_messages(raw: dict, where: str) -> list[Message]:
    """`prompt` as chat messages: a string is one user turn; a list must already be messages, each a
    role and a string content."""
    prompt = _require(raw, "prompt", where)
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        )
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise RowError(f"{where}: prompt must be a non-empty string or a list of {{role, content}} messages with string values")


def _labelled_pair(dimension: str | None, where: str) -> dict[str, int]:
    if dimension not in ("helpful", "safe"):
        raise SafeAlignError(f"{where}: chosen/rejected data needs `dimension: helpful` or `dimension: safe`")
    return {
        "better_response_id": 0 if dimension == "helpful" else -1,
        "safer_response_id": 0 if dimension == "safe" else -1,
    }


def from_pairs(raw: dict, where: str, dimension: str | None = None) -> PreferenceRow:
    """`chosen`/`rejected` (+ `prompt`): chosen becomes response 0, preferred in `dimension` only."""
    return PreferenceRow(
        prompt=_prompt_messages(raw, where),
        response_0=_text(raw, "chosen", where),
        response_1=_text(raw, "rejected", where),
        source=where,
        **_labelled_pair(dimension, where),
        **_scored_fields(raw, where),
    )


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_turns(transcript: str, where: str) -> list[Message]:
    parts = _HH_TURN.split(transcript)
    if len(parts) < 5 or parts[0].strip():
        raise RowError(f"{where}: not an HH-RLHF transcript ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def from_hh_rlhf(raw: dict, where: str, dimension: str | None = None) -> PreferenceRow:
    """HH-RLHF: both transcripts share all turns but the last Assistant turn, which is the response."""
    chosen = _hh_turns(_text(raw, "chosen", where), where)
    rejected = _hh_turns(_text(raw, "rejected", where), where)
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1]:
        raise SkippedRow(f"{where}: chosen and rejected differ before the final Assistant turn")
    if not chosen[-1]["content"] or not rejected[-1]["content"]:
        raise SkippedRow(f"{where}: empty final Assistant turn")
    return PreferenceRow(
        prompt=chosen[:-1],
        response_0=chosen[-1]["content"],
        response_1=rejected[-1]["content"],
        source=where,
        **_labelled_pair(dimension, where),
    )


ADAPTERS: dict[str, Callable[[dict, str, str | None], PreferenceRow]] = {
    "pku_saferlhf": from_pku_saferlhf,
    "pairs": from_pairs,
    "hh_rlhf": from_hh_rlhf,
}


#: Deeper JSON than any data row needs; Python's parser would hit its recursion limit near 1,000.
MAX_JSON_DEPTH = 100


def read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a file that cannot be read (permissions, a `.gz`
    that is not gzip or is cut short) or a malformed line (not UTF-8, not JSON, nested absurdly deep, an
    integer past Python's 4,300 digits, a lone UTF-16 surrogate, not an object) is an error naming it."""
    number = 0
    try:
        with _open_data(path) as handle:
            for number, raw in enumerate(handle, start=1):
                obj = _parse_line(path, number, raw)
                if obj is not None:
                    yield number, obj
    except (OSError, EOFError, zlib.error) as exc:
        where = f"{path}:{number + 1}" if number else str(path)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        hint = "check the file's permissions" if isinstance(exc, PermissionError) else "is the file complete and what its name says?"
        raise RowError(f"{where}: cannot be read ({reason}); {hint}") from None


def _open_data(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _parse_line(path: Path, number: int, raw: bytes) -> dict | None:
    """One JSONL line as an object (None when blank), or a RowError naming `path:number`."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RowError(f"{path}:{number}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                       f"{exc.start + 1}); save the file as UTF-8") from None  # fmt: skip
    if not line.strip():
        return None
    if json_nesting(line) > MAX_JSON_DEPTH:
        raise RowError(f"{path}:{number}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RowError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    except ValueError as exc:  # e.g. an integer past sys.get_int_max_str_digits()
        raise RowError(f"{path}:{number}: not valid JSON ({str(exc).split(';')[0]})") from None
    if not isinstance(obj, dict):
        raise RowError(f"{path}:{number}: each line must be a JSON object")
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError(f"{path}:{number}: a string holds a lone UTF-16 surrogate ({exc.object[exc.start]!r}), "
                       "which is not text; fix the escape in the file") from None  # fmt: skip
    return obj


def json_nesting(text: str) -> int:
    """The nesting depth of a JSON text, brackets inside strings ignored, computed without recursion
    (Python's own parser recurses, and a line of 100,000 `[` crashes it)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


#: The reads whose skipped rows were reported already: said once per process, not once per read.
_REPORTED_SKIPS: set[tuple[str, int, int | None]] = set()


def load_rows(
    path: Path, fmt: Format, dimension: str | None = None, max_rows: int | None = None, skip_rows: int = 0
) -> list[PreferenceRow]:
    """Read and validate one source (its records after the first `skip_rows`, at most `max_rows`);
    errors name `file:line` and the field."""
    if not path.is_file():
        raise SafeAlignError(f"{path}: data file not found")
    adapter = ADAPTERS[fmt]
    rows, skipped = [], []
    for record, (number, raw) in enumerate(read_jsonl(path)):
        if record < skip_rows:
            continue
        if max_rows is not None and len(rows) >= max_rows:
            break
        try:
            rows.append(adapter(raw, f"{path}:{number}", dimension))
        except SkippedRow as exc:
            skipped.append(str(exc))
    if skipped and (str(path), skip_rows, max_rows) not in _REPORTED_SKIPS:  # a stage reads a file more than once
        _REPORTED_SKIPS.add((str(path), skip_rows, max_rows))
        log.warning("%s: skipped %d row(s) without a usable pair (an empty response, transcripts that differ "
                    "before the last turn), e.g. %s", path.name, len(skipped), skipped[0])  # fmt: skip
    if not rows:
        raise SafeAlignError(f"{path}: no usable rows (the dataset is empty)")
    check_consistent(rows)
    return rows


def load_sources(sources: Iterable) -> list[PreferenceRow]:
    """Every source of a recipe's `data.train` or `eval.heldout_pairs` (objects with path, format,
    dimension, max_rows, skip_rows), as one list."""
    rows = [row for s in sources for row in load_rows(s.path, s.format, s.dimension, s.max_rows, s.skip_rows)]
    check_consistent(rows)
    return rows


def check_consistent(rows: list[PreferenceRow]) -> None:
    """RM-stage numbers must cover every row or none: a half-scored dataset would silently mix
    dynamic and plain β, or cached and live reference log-probs."""
    for key in OPTIONAL_FLOATS:
        missing = [row for row in rows if getattr(row, key) is None]
        if missing and len(missing) != len(rows):
            first = missing[0].source or "a row"
            raise RowError(f"{first}: {key} is missing here but present in other rows; score all rows or none")


def load_prompt_file(path: Path) -> list[list[Message]]:
    """A prompt set (JSONL, one `prompt` per line: a string or chat messages), e.g. for the distill stage."""
    if not path.is_file():
        raise SafeAlignError(f"{path}: prompt file not found")
    prompts = [_prompt_messages(raw, f"{path}:{number}") for number, raw in read_jsonl(path)]
    if not prompts:
        raise SafeAlignError(f"{path}: no prompts (the file is empty)")
    return prompts


def unique_prompts(prompts: Iterable[list[Message]]) -> list[list[Message]]:
    """Each distinct prompt once (by `prompt_identity`), in first-seen order."""
    seen: dict[str, list[Message]] = {}
    for prompt in prompts:
        seen.setdefault(prompt_identity(prompt), prompt)
    return list(seen.values())


def flatten_messages(messages: list[Message]) -> str:
    """A prompt for models without a chat template (`data.input_template`): one user turn is its
    text; a dialogue keeps its roles. Training and generation format prompts through this one function."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def has_field(rows: list[PreferenceRow], key: str) -> bool:
    """Whether the (consistent) rows carry `key`."""
    return getattr(rows[0], key) is not None


def prompt_identity(messages: list[Message]) -> str:
    """A stable identity of a prompt, for splits, deduplication and keeping eval prompts out of training."""
    text = "\x1e".join(f"{m['role']}\x1f{m['content'].strip()}" for m in messages)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pair_identity(row: PreferenceRow) -> str:
    """A stable identity of a response pair (its prompt and both responses, in order): the same pair read
    from its data file and from a stage's output, whatever fields the stage added."""
    text = "\x1e".join((prompt_identity(row.prompt), row.response_0, row.response_1))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def conversation_identity(messages: list[Message]) -> str:
    """The conversation a prompt belongs to: its first user turn, lower-cased, punctuation and spacing
    removed. HH-RLHF holds several pairs of one conversation (a prompt that extends another, the same
    opening asked again with other capitals or a missing question mark); they share this identity, so a
    split that keeps conversations whole keeps a held-out answer out of a training prompt."""
    first = next((m["content"] for m in messages if m["role"] == "user"), messages[0]["content"] if messages else "")
    words = "".join(ch.lower() if ch.isalnum() else " " for ch in first).split()
    return hashlib.sha256(" ".join(words).encode("utf-8")).hexdigest()


def _bucket(identity: str, seed: int | str) -> float:
    """An identity's pseudo-random place in [0, 1): a pure function of the identity and the seed."""
    digest = hashlib.sha256(f"{seed}:{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _prompt_bucket(prompt: list[Message], seed: int | str) -> float:
    """A prompt's pseudo-random place in [0, 1)."""
    return _bucket(prompt_identity(prompt), seed)


def held_out_indices(rows: list[PreferenceRow], eval_fraction: float, seed: int) -> set[int]:
    """Indices of the held-out rows: a deterministic share of conversations, so pairs sharing a prompt —
    or a conversation (`conversation_identity`) — land on one side of the split."""
    return {i for i, row in enumerate(rows) if _bucket(conversation_identity(row.prompt), seed) < eval_fraction}


def prompt_folds(rows: list[PreferenceRow], folds: int, seed: int) -> list[int]:
    """Each row's cross-validation fold (0..folds-1), by prompt: pairs sharing a prompt share a fold."""
    return [min(folds - 1, int(_prompt_bucket(row.prompt, seed) * folds)) for row in rows]


def hold_out_prompts(
    rows: list[PreferenceRow], count: int, seed: int
) -> tuple[list[list[Message]], list[PreferenceRow]]:
    """`count` distinct prompts chosen by seed (the same ones whatever order the rows come in), and the
    rows that do not use them. Every pair of a chosen prompt leaves the returned rows."""
    if count == 0:
        return [], rows
    prompts = sorted(unique_prompts(row.prompt for row in rows), key=lambda p: _prompt_bucket(p, seed))
    if len(prompts) <= count:
        raise SafeAlignError(
            f"holding out {count} prompts leaves no training rows: the data has {len(prompts)} distinct prompts"
        )
    chosen = prompts[:count]
    identities = {prompt_identity(p) for p in chosen}
    return chosen, [row for row in rows if prompt_identity(row.prompt) not in identities]


def flip_labels(row: PreferenceRow) -> PreferenceRow:
    """The row with both preferences reversed (a missing label stays missing) and the reward models'
    margins, which are oriented by the labels, negated: as if the annotators had chosen the other answer."""
    return replace(
        row,
        better_response_id=1 - row.better_response_id if row.better_response_id >= 0 else -1,
        safer_response_id=1 - row.safer_response_id if row.safer_response_id >= 0 else -1,
        delta_h=None if row.delta_h is None else -row.delta_h,
        delta_s=None if row.delta_s is None else -row.delta_s,
    )


def relabel(rows: list[PreferenceRow], labels: str, seed: int) -> list[PreferenceRow]:
    """`align.labels`: the rows as given, every row flipped, or each row flipped by a coin seeded by its
    prompt (`shuffled`: the same rows and steps with the preference made independent of the content —
    the label-free control a real effect must beat)."""
    if labels == "given":
        return rows
    if labels == "flipped":
        return [flip_labels(row) for row in rows]
    return [flip_labels(row) if _pair_coin(row, seed) else row for row in rows]


def _pair_coin(row: PreferenceRow, seed: int) -> bool:
    digest = hashlib.sha256(f"labels:{seed}:{prompt_identity(row.prompt)}:{row.response_0}:{row.response_1}".encode())
    return digest.digest()[0] % 2 == 1


def subset_by_prompt(rows: list[PreferenceRow], count: int, seed: int) -> list[PreferenceRow]:
    """At most `count` rows, kept in their original order: the rows labelled on more dimensions first (a
    pair with both labels feeds both losses, and helpfulness labels are the scarce ones in the evidence
    data), then by prompt in a seeded order (its own salt: independent of the other splits). The same
    subset for every variant that asks for `count`, and a smaller one inside a larger one."""

    def rank(i: int) -> tuple:
        labels = (rows[i].better_response_id >= 0) + (rows[i].safer_response_id >= 0)
        return -labels, _prompt_bucket(rows[i].prompt, f"subset:{seed}"), i

    ranked = sorted(range(len(rows)), key=rank)
    return [rows[i] for i in sorted(ranked[:count])]


def split_by_prompt(
    rows: list[PreferenceRow], eval_fraction: float, seed: int
) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """Deterministic train/eval split on prompt identity (see `held_out_indices`)."""
    held = held_out_indices(rows, eval_fraction, seed)
    train = [row for i, row in enumerate(rows) if i not in held]
    if not train:
        raise SafeAlignError(f"eval_fraction={eval_fraction} leaves no training rows")
    return train, [rows[i] for i in sorted(held)]
