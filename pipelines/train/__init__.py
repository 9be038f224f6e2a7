"""Training SAEs (``featuredict train-sae``)."""
