"""The layer-dropped student derived from a teacher (the distill stage's default student)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from safealign.core.errors import SafeAlignError
from safealign.models.resolve import build_random, count_parameters, derive_student
from safealign.recipe import RandomModel


@pytest.fixture(scope="module")
def teacher(tokenizer_dir):
    config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 5}
    return build_random(RandomModel(tokenizer=str(tokenizer_dir), config=config, seed=11))


def test_student_keeps_every_other_layer_with_the_teachers_weights(teacher, tmp_path):
    student_dir = derive_student(teacher, tmp_path / "student")
    t = AutoModelForCausalLM.from_pretrained(teacher)
    s = AutoModelForCausalLM.from_pretrained(student_dir)
    assert t.config.num_hidden_layers == 5 and s.config.num_hidden_layers == 3  # layers 0, 2, 4
    for new, old in enumerate((0, 2, 4)):
        for (name, ps), (_, pt) in zip(s.model.layers[new].named_parameters(), t.model.layers[old].named_parameters()):
            assert torch.equal(ps, pt), (new, old, name)
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight)
    assert torch.equal(s.model.norm.weight, t.model.norm.weight)
    assert sum(p.numel() for p in s.parameters()) < sum(p.numel() for p in t.parameters())
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    assert s(ids).logits.shape == t(ids).logits.shape  # a working causal LM with the teacher's vocabulary
    assert (student_dir / "tokenizer_config.json").exists()


def test_a_one_layer_teacher_cannot_be_halved(tokenizer_dir, tmp_path):
    shallow = build_random(
        RandomModel(
            tokenizer=str(tokenizer_dir), config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
        )
    )
    with pytest.raises(SafeAlignError, match="nothing to drop"):
        derive_student(shallow, tmp_path / "student")
    assert not (tmp_path / "student").exists()  # nothing half-written


def test_parameter_count_matches_torch_and_counts_a_tied_head_once(teacher, tmp_path):
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(teacher)
    assert model.config.tie_word_embeddings
    assert count_parameters(teacher) == sum(p.numel() for p in model.parameters())  # torch dedups tied tensors
    # OpenRLHF's save_model writes the tied head as a tensor of its own: still one set of parameters
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    (tmp_path / "saved").mkdir()
    save_file(state, tmp_path / "saved" / "model.safetensors")
    shutil.copy(teacher / "config.json", tmp_path / "saved")
    assert count_parameters(tmp_path / "saved") == count_parameters(teacher)
