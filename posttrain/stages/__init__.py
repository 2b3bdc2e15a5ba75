"""The stages of a round, one module each (the order is posttrain.stage.REGISTRY)."""
