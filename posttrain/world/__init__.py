"""The embedded world: a tiny base model, a verifiable synthetic task, simulated annotators."""
