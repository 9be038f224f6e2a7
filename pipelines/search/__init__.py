"""Finding features: by prompt, by concept, by meaning, and the review queue's priorities."""
