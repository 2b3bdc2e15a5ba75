"""posttrain: iterative LLM post-training, the Llama 3 loop (rm, sample, sft, dpo, average).

    import posttrain
    posttrain.run_round(1, "recipes/general.yaml", "runs/general", reward=MyReward())

Attributes load lazily, so `import posttrain` is cheap and has no side effects.
"""

__version__ = "0.1.0"

_API = {"run_round", "run", "validate", "validate_data", "status_table", "evaluate", "report", "average", "demo",
        "world", "verify"}


def __getattr__(name):
    if name in _API:
        from posttrain import api

        return getattr(api, name)
    if name == "load_recipe":
        from posttrain.recipe import load_recipe

        return load_recipe
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")


def __dir__():
    return sorted(_API | {"load_recipe", "__version__"})
