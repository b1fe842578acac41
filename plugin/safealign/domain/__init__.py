"""The method and its data, without a recipe or OpenRLHF: preference rows and splits (`data`), λ's dual
update (`lagrange`), the cost model's loss (`cost_loss`), per-step training statistics (`metrics`), and
answers sampled from a model by transformers or vLLM (`generation`). The preference losses are
`safealign.losses`, kept at the package root because plugins subclass them there."""
