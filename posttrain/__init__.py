"""posttrain: iterative LLM post-training, the Llama 3 loop (rm, sample, sft, dpo, average)."""

__version__ = "0.1.0"
