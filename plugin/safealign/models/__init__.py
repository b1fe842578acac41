"""The models a recipe names, as local folders OpenRLHF can load (`resolve`), the pooled value model
(`pooled_value`), and the provenance of cached reference log-probs (`provenance`)."""
