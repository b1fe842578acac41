"""SafeAlign: Safe-MM-DPO for OpenRLHF — align a model to be helpful and harmless.

The light modules (losses, lagrange, recipe, data) import without OpenRLHF; the trainer and stages
import it through the adapter `safealign.openrlhf`, which applies its patches first.
"""

__version__ = "0.1.0"
