"""Running recipes: one run's stages in order with fingerprints, atomic publish and resume (`runner`),
and a sweep of runs over a grid (`sweep`)."""
