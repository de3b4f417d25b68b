"""Ray Tune search: spaces, the weakly-supervised objective, k-fold CV, results."""
