"""The eval stage's parts: generation backends, judges, BeaverTails safety, MT-Bench, the report."""
