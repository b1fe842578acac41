"""SafeAlign: Safe-MM-DPO for OpenRLHF — align a model to be helpful and harmless.

Folders are the layers of docs/architecture.md (core → domain → recipe/models → openrlhf → trainers →
workflows → stages → orchestration → cli); the two modules at the root are the public ones: `cli` and
`losses` (subclass `safealign.losses.PreferenceLoss` to add a loss). Everything below the OpenRLHF
adapter imports without OpenRLHF; above it, OpenRLHF comes through `safealign.openrlhf`, which applies
its patches first.
"""

__version__ = "0.1.0"
