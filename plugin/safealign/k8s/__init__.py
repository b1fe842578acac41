"""Kubernetes: render the stage charts (`charts/`), submit a recipe's stages as Jobs, watch them.

The Job template exists once, in the Helm library chart `safealign-common`; `helm install`, the plain
manifests in `manifests/` and `safealign submit` all render it with Helm's own engine
(helm-python-sdk), so the three can never disagree about what a stage Job is.
"""
