"""Consent before a model folder's own Python runs.

A Hugging Face folder whose `config.json` (or tokenizer/processor config) has an `auto_map` names
Python modules that `from_pretrained(..., trust_remote_code=True)` imports, i.e. runs. OpenRLHF 0.11.2
passes `trust_remote_code=True` on every load, so without a check here, pointing a recipe at a
downloaded folder would execute whatever it ships. The recipe's `model.trust_remote_code` (default
false) is the consent: without it such a folder is refused before anything loads; with it, the files
that will run are named in the log. Our own loads pass the same flag to transformers and vLLM.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safealign.core.errors import SafeAlignError

log = logging.getLogger("safealign")

#: The files in which transformers looks for `auto_map` (model, tokenizer, processors).
CONFIG_FILES = (
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "feature_extractor_config.json",
    "image_processor_config.json",
)

_warned: set[Path] = set()


def _auto_map_targets(auto_map: object) -> list[str]:
    """`{"AutoModel": "modeling_x.Cls", "AutoTokenizer": ["tok.Slow", null]}` -> ["modeling_x", "tok"];
    a reference into another repository (`org/repo--module.Cls`) is kept whole."""
    values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    targets = []
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item:
                targets.append(item.rsplit(".", 1)[0])
    return targets


def code_files(model_dir: Path) -> list[str]:
    """What loading `model_dir` would run: the modules its `auto_map` entries name (as `<module>.py`,
    or `<repo>--<module>` for code fetched from elsewhere) and every other `.py` file beside them (a
    module may import its siblings). Empty when no config has an `auto_map`."""
    targets: list[str] = []
    for name in CONFIG_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue  # not ours to judge here: the loader reports a broken config
        if isinstance(config, dict) and config.get("auto_map"):
            targets += _auto_map_targets(config["auto_map"])
    if not targets:
        return []
    named = {t if "--" in t else f"{t}.py" for t in targets}
    return sorted(named | {p.name for p in model_dir.glob("*.py")})


def check_model_code(field: str, model_dir: Path, trusted: bool) -> None:
    """Refuse (untrusted) or announce (trusted) the Python that loading `model_dir` would run."""
    files = code_files(model_dir)
    if not files:
        return
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    if not trusted:
        raise SafeAlignError(
            f"{field}: {model_dir} ships its own Python ({shown}) that loading it would run; read it, and if you "
            "trust it set model.trust_remote_code: true"
        )
    if model_dir not in _warned:
        _warned.add(model_dir)
        log.warning("model.trust_remote_code: loading %s (%s) runs %s", field, model_dir, shown)
