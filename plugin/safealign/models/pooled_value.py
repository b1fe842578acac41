"""A value model that reads the whole response: the mean of one decoder layer's hidden states over the
response's tokens, then a linear head.

Why not OpenRLHF's value head (a linear map of the *last* token's final-layer state): on this project's
data a freshly initialised last-token head trained for an epoch stayed at chance (0.52 pair accuracy) and
gave every answer the same cost, so λ followed that offset, not the policy (docs/results.md). Harmfulness is
close to linearly readable from what an instruction-tuned model's middle-to-late layers hold about the
whole answer; averaging over the answer's tokens reads it from all of them, and stopping at that layer
drops the decoder layers above it (at the default 2/3 depth, a third of the scoring work). Measured on
PKU-SafeRLHF with a frozen SmolLM2-135M: benchmarks/cost_probe.py, docs/rm.md.

A pooled model is a directory of its own: the backbone cut at the chosen layer (an HF `AutoModel`
checkpoint whose config has `num_hidden_layers` = that layer), its tokenizer, the head
(`value_head.safetensors`: `weight` [hidden], `bias` []) and `safealign_value_model.json` (how it was made
and the `max_len` it was trained at: it scores at that length too). Every scorer (the rm stage's pass, Ĵ_C,
the eval judge) asks `is_pooled` and loads it with `PooledValueModel.load`; any other value model is
OpenRLHF's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from safealign.core.errors import SafeAlignError

SPEC_FILE = "safealign_value_model.json"
HEAD_FILE = "value_head.safetensors"
#: The recipe's parameter dtypes as torch's (the spec records the one a model was fitted in).
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_pooled(model_dir: Path) -> bool:
    """Whether `model_dir` holds a pooled value model (else an OpenRLHF value-head checkpoint)."""
    return (Path(model_dir) / SPEC_FILE).is_file()


def read_spec(model_dir: Path) -> dict:
    """What `save_pooled` recorded: layer, pooling, max_len, dtype, base, fit statistics. A model folder is
    outside input (`model.cost_model` may name any): a damaged spec is one line, not a traceback."""
    path = Path(model_dir) / SPEC_FILE
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SafeAlignError(f"{path}: not a readable pooled value model spec ({exc})") from None
    if not (isinstance(spec, dict) and isinstance(spec.get("max_len"), int) and spec.get("dtype") in TORCH_DTYPES):
        raise SafeAlignError(f"{path}: a pooled value model spec needs an integer max_len and dtype fp32 or bf16")
    return spec


def response_mask(attention_mask: torch.Tensor, prompt_lens: list[int]) -> torch.Tensor:
    """The response's tokens of left-padded sequences (OpenRLHF's reward-model batches): the real tokens
    after each row's first `prompt_len` ones. A response cut away entirely by truncation keeps its last
    token, so every row has something to average."""
    real = attention_mask.bool()
    seen = real.long().cumsum(dim=1)  # 1 at the first real token
    lens = torch.tensor(prompt_lens, device=attention_mask.device).unsqueeze(1)
    mask = real & (seen > lens)
    empty = ~mask.any(dim=1)
    if empty.any():
        mask[empty, -1] = real[empty, -1]
    return mask


def truncated_backbone(base_dir: Path, layer: int, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The base model without its LM head, cut after decoder layer `layer` (the layers above are never
    loaded); its output is that layer's hidden states after the model's final norm."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    depth = config.num_hidden_layers
    if not 1 <= layer <= depth:
        raise ValueError(f"layer {layer}: the model has decoder layers 1..{depth}")
    config.num_hidden_layers = layer
    model = AutoModel.from_pretrained(base_dir, config=config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval().requires_grad_(False)


class PooledValueModel(nn.Module):
    """backbone → mean over response tokens → linear head: one value per sequence."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype = torch.float32) -> PooledValueModel:
        from safetensors.torch import load_file
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(model_dir, dtype=dtype).eval().requires_grad_(False)
        weights = load_file(str(Path(model_dir) / HEAD_FILE))
        head = nn.Linear(weights["weight"].numel(), 1)
        with torch.no_grad():
            head.weight.copy_(weights["weight"].reshape(1, -1))
            head.bias.copy_(weights["bias"].reshape(1))
        return cls(backbone, head.requires_grad_(False))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: list[int]) -> torch.Tensor:
        """The mean hidden state over each sequence's response tokens, in float32: `[B, hidden]`."""
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        mask = response_mask(attention_mask, prompt_lens).unsqueeze(-1).float()
        return (states * mask).sum(dim=1) / mask.sum(dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens: list[int]) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask, prompt_lens)).squeeze(-1)

    def pair(self, batch, features: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Both responses of a reward-model pair batch (`ids_0, mask_0, ids_1, mask_1, extras` with
        `extras.prompt_lens`), on this model's device: their values, or their pooled features."""
        ids_0, mask_0, ids_1, mask_1, extras = batch
        device = next(self.parameters()).device
        read = self.features if features else self
        return (read(ids_0.to(device), mask_0.to(device), extras.prompt_lens),
                read(ids_1.to(device), mask_1.to(device), extras.prompt_lens))  # fmt: skip


def save_pooled(out: Path, backbone: nn.Module, tokenizer, weight: torch.Tensor, bias: torch.Tensor, spec: dict) -> None:
    """Write a pooled value model into `out` (the caller publishes the directory atomically)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(out)
    tokenizer.save_pretrained(out)
    head = {"weight": weight.detach().float().contiguous(), "bias": bias.detach().float().reshape(())}
    save_file(head, str(out / HEAD_FILE))
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
