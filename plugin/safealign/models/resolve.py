"""Turn a recipe's model spec into a local Hugging Face directory that OpenRLHF can load.

OpenRLHF's `Actor` and `get_tokenizer` take a path, so every spec resolves to one:
- an HF directory (has `config.json`) is used as is;
- a `.gguf` file, or `gguf:<pip distribution>` (the GGUF shipped inside an installed package, found
  through the distribution's file list, never by importing it), is dequantised by transformers once
  and cached as an ordinary HF directory (`save_pretrained` refuses GGUF-loaded models, so the weights
  are moved into a fresh model built from the same config);
- `{random: {tokenizer, config, seed}}` builds a randomly initialised Llama with that tokenizer, for
  tests and dry runs.
Conversions go to a cache keyed by the spec, written to a temporary directory and renamed, so two
processes (e.g. torchrun ranks) or a crash never leave a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

from safealign.core.errors import SafeAlignError
from safealign.core.files import require_writable_dir
from safealign.core.gguf import check_gguf, find_packaged_gguf
from safealign.core.remote_code import check_model_code
from safealign.recipe import ModelSection, ModelSpec, RandomModel, RandomModelSpec


def cache_root() -> Path:
    """Where converted models live: $SAFEALIGN_CACHE, else ~/.cache/safealign."""
    return Path(os.environ.get("SAFEALIGN_CACHE", Path.home() / ".cache" / "safealign")).expanduser()


def _publish(build, target: Path) -> Path:
    """Run `build(tmp_dir)` and rename the result to `target` atomically (first writer wins)."""
    if (target / "config.json").is_file():
        return target
    require_writable_dir("model directory", target.parent)  # the model cache may be a volume uid 1000 cannot write
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process published it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint into a cached HF directory (model + tokenizer + chat template)."""
    check_gguf(gguf)
    stat = gguf.stat()
    target = cache_root() / "models" / f"{gguf.stem}-{_key(str(gguf.resolve()), stat.st_size, stat.st_mtime)}"

    def build(out: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"[safealign] converting {gguf.name} to a Hugging Face checkpoint (once; cached in {target})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, OSError, EOFError, struct.error, KeyError, IndexError, TypeError) as exc:
            raise SafeAlignError(
                f"{gguf}: cannot be read as a GGUF checkpoint ({type(exc).__name__}: {str(exc)[:200]}); a cut-short "
                "download looks like this: download it again"
            ) from None
        fresh = type(loaded)(loaded.config)
        fresh.load_state_dict(loaded.state_dict())
        fresh.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(build, target)


def build_random(spec: RandomModel, trust_remote_code: bool = False) -> Path:
    """A random-weight Llama with the tokenizer of `spec.tokenizer`, cached by its settings."""
    tokenizer_dir = resolve_tokenizer(spec.tokenizer, trust_remote_code)
    target = cache_root() / "models" / f"random-{_key(str(tokenizer_dir), spec.config, spec.seed)}"

    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        fields = {
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            **spec.config,
        }
        try:
            config = LlamaConfig(**fields)
        except (TypeError, ValueError) as exc:
            raise SafeAlignError(f"model random.config: {exc}") from None
        torch.manual_seed(spec.seed)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(build, target)


def resolve_tokenizer(spec: str, trust_remote_code: bool = False) -> Path:
    """A directory holding a tokenizer: a tokenizer-only directory, or any model spec's directory (its
    shipped code checked either way: a tokenizer config's `auto_map` runs code too)."""
    path = Path(spec).expanduser()
    if path.is_dir() and ((path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()):
        check_model_code(f"tokenizer {path.name}", path, trust_remote_code)
        return path
    return resolve_model(spec, trust_remote_code)


def resolve_model(spec: ModelSpec, trust_remote_code: bool = False) -> Path:
    """A local HF directory for any model spec the recipe accepts, checked for shipped code where it is
    about to be loaded (`check_model_code`), not only at validate: a folder can change in between, and a
    built one (random, GGUF) is checked like any other."""
    model_dir = _model_dir(spec, trust_remote_code)
    check_model_code(f"model {model_dir.name}", model_dir, trust_remote_code)
    return model_dir


def _model_dir(spec: ModelSpec, trust_remote_code: bool) -> Path:
    if isinstance(spec, RandomModelSpec):
        return build_random(spec.random, trust_remote_code)
    if spec.startswith("gguf:"):
        return convert_gguf(find_packaged_gguf(spec.removeprefix("gguf:")))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise SafeAlignError(
        f"model {spec!r}: not an HF directory with config.json, a .gguf file, or gguf:<package> "
        "(hub names are not downloaded: fetch the model first and give its directory)"
    )


def policy_and_reference(model: ModelSection) -> tuple[Path, Path]:
    """The base policy's directory and its frozen reference's (`model.reference`, else the policy)."""
    policy = resolve_model(model.policy, model.trust_remote_code)
    return policy, resolve_model(model.reference, model.trust_remote_code) if model.reference is not None else policy


def merge_lora(base_dir: Path, adapter_dir: Path, target: Path, trust_remote_code: bool = False) -> Path:
    """Fold a LoRA adapter into its base weights and save a complete HF checkpoint at `target`.

    Later stages (and anything else that loads `align/model`) then never need PEFT; the adapter stays
    beside it for whoever wants only the delta.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(out: Path) -> None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(out)
        AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code).save_pretrained(out)

    return _publish(build, target)


_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def derive_student(teacher_dir: Path, target: Path, trust_remote_code: bool = False) -> Path:
    """A half-depth student initialised from the teacher: every other decoder layer (0, 2, 4, …).

    DistilBERT's initialisation (Sanh et al. 2019): the student keeps the teacher's embeddings, final
    norm and LM head, and layers at even indices renumbered 0, 1, 2, …, so it starts close to the
    teacher's function at about half the compute per token. Per-layer config lists (e.g. `layer_types`)
    are subset the same way. Works for any decoder whose weights are named `*.layers.<i>.*`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def build(out: Path) -> None:
        trusted = {"trust_remote_code": trust_remote_code}
        config = AutoConfig.from_pretrained(teacher_dir, **trusted)
        depth = config.num_hidden_layers
        if depth < 2:
            raise SafeAlignError(f"distill.student: the teacher has {depth} layer(s); nothing to drop")
        kept = list(range(0, depth, 2))
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, **trusted)
        config.num_hidden_layers = len(kept)
        for name, value in list(config.to_dict().items()):
            if isinstance(value, list) and len(value) == depth and name != "architectures":
                setattr(config, name, [value[i] for i in kept])
        renumber = {old: new for new, old in enumerate(kept)}
        state = {}
        for key, tensor in teacher.state_dict().items():
            match = _LAYER_KEY.match(key)
            if match is None:
                state[key] = tensor
            elif int(match.group(2)) in renumber:
                state[f"{match.group(1)}{renumber[int(match.group(2))]}{match.group(3)}"] = tensor
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **trusted)
        missing, unexpected = student.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
        if missing or unexpected:
            raise SafeAlignError(
                f"distill.student: teacher weights do not map onto the student ({missing[:3]} {unexpected[:3]})"
            )
        student.save_pretrained(out)
        AutoTokenizer.from_pretrained(teacher_dir, **trusted).save_pretrained(out)

    return _publish(build, target)


def count_parameters(model_dir: Path) -> int:
    """Unique parameters of a checkpoint, read from its safetensors headers (no model load).

    A tied LM head counts once: OpenRLHF's `save_model` writes `lm_head.weight` beside the embedding
    even when `tie_word_embeddings` makes them one tensor."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise SafeAlignError(f"{model_dir}: no .safetensors weights to count")
    shapes: dict[str, list[int]] = {}
    for path in files:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        shapes.update({name: entry["shape"] for name, entry in header.items() if name != "__metadata__"})
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("tie_word_embeddings") and any(name.endswith("embed_tokens.weight") for name in shapes):
        shapes.pop("lm_head.weight", None)
    return sum(math.prod(shape) for shape in shapes.values())
