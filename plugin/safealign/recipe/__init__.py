"""The recipe: one YAML file describing a whole run, validated before anything starts.

Every section is a strict pydantic model: an unknown key, a wrong type, a missing data file or an
out-of-range value fails at load time with one line that names the field (`align.lambda_init: …`).
Loss settings the selected loss does not use are rejected too, so a recipe never carries a value
that silently does nothing. Paths in a recipe are relative to the recipe file.

`kl_coeff`: in a DPO recipe the reverse-KL coefficient of the RLHF objective that DPO solves in closed
form *is* β (Rafailov et al. 2023, eq. 3-7), so `align.kl_coeff` is accepted as the RLHF name of
`align.beta_ori`. Giving both with different values is an error; there is no second KL penalty.

The package: `schema` (the sections and `Recipe`), `loading` (YAML, `extends:`, `--set`, validation into a
`Recipe`), `checks` (what a recipe is checked for beyond its schema, and what it implies for the stages).
What the rest of SafeAlign imports is re-exported here, so `from safealign.recipe import Recipe` reads as
before.
"""

from safealign.recipe.checks import (
    check_wandb,
    check_world_size,
    divisors,
    samples_policy_cost,
    sampling_variant,
)
from safealign.recipe.loading import flatten_recipe, load_recipe, merge, trial_overrides, validate_recipe
from safealign.recipe.schema import (
    AlignSection,
    CostModelSection,
    ModelSection,
    ModelSpec,
    RandomModel,
    RandomModelSpec,
    Recipe,
    RewardModelSection,
    TrainingSection,
    results_dump,
)

__all__ = [
    "AlignSection", "CostModelSection", "ModelSection", "ModelSpec", "RandomModel", "RandomModelSpec", "Recipe",
    "RewardModelSection", "TrainingSection", "check_wandb", "check_world_size", "divisors", "flatten_recipe",
    "load_recipe", "merge", "results_dump", "samples_policy_cost", "sampling_variant", "trial_overrides",
    "validate_recipe",
]  # fmt: skip
