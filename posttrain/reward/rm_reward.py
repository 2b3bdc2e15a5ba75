"""The reward model trained by the `rm` stage, as a reward."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

from posttrain.reward.base import Message


class RMReward:
    """Scores (prompt, response) with a trained reward model (a sequence classifier, one output).

    Each sample is rendered with the model's chat template (prompt conversation + the response as
    the assistant turn, end-of-turn token included), batches are right-padded and the score is
    read at each row's last real token: the same position the `rm` stage trained on.
    A sample longer than `max_length` tokens is abstained on (None), never truncated: a score
    read from a cut response would be a score of another response.

    path: model folder (e.g. the `rm` stage's output); batch_size: rows per forward pass;
    device: "auto" (cuda when present), "cpu", "cuda:1", ...; dtype: "auto" (bf16 on a GPU that
    supports it, else fp32), "float32", "bfloat16", "float16".
    `setup()` loads the model (also done lazily by the first `score`), `teardown()` frees it.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int = 16, device: str = "auto",
                 dtype: str = "auto", max_length: int | None = None, trust_remote_code: bool = False,
                 name: str | None = None):
        if batch_size <= 0:
            raise ValueError(f"RMReward: batch_size must be positive, got {batch_size}")
        self.path = Path(path)
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.max_length = max_length
        self.trust_remote_code = trust_remote_code
        self.name = name or f"rm:{self.path}"
        self.model: Any = None
        self.tokenizer: Any = None
        self.abstained = 0
        """Samples abstained on (longer than max_length) since setup."""

    def fingerprint(self) -> str:
        """The reward model's content hash: the same weights score the same, wherever they lie."""
        from posttrain.files import hash_path

        return f"rm:{hash_path(self.path)}:{self.max_length}"

    def setup(self) -> None:
        if self.model is not None:
            return
        from posttrain.modeling import load_sequence_classifier, load_tokenizer

        if not self.path.is_dir():
            raise FileNotFoundError(f"RMReward: no model folder at {self.path}")
        self.tokenizer = load_tokenizer(self.path, trust_remote_code=self.trust_remote_code)
        self.model = load_sequence_classifier(self.path, dtype=self.dtype, device=self.device,
                                              trust_remote_code=self.trust_remote_code).eval()
        if self.max_length is None:
            self.max_length = getattr(self.model.config, "max_position_embeddings", None)
        self.abstained = 0

    def teardown(self) -> None:
        if self.model is None:
            return
        import torch

        self.model = None
        self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def encode(self, prompt: list[Message], response: str) -> list[int]:
        from posttrain import chat

        return chat.encode_example(self.tokenizer, prompt, response, None).input_ids

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[float | None]:
        import torch

        from posttrain.modeling import last_token_scores

        self.setup()
        rows = [self.encode(p, r) for p, r in zip(prompts, responses)]
        out: list[float | None] = [None] * len(rows)
        todo = [i for i, ids in enumerate(rows) if self.max_length is None or len(ids) <= self.max_length]
        self.abstained += len(rows) - len(todo)
        # Longest first keeps padding low and shows an out-of-memory on the first batch.
        todo.sort(key=lambda i: -len(rows[i]))
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                idx = todo[start:start + self.batch_size]
                L = max(len(rows[i]) for i in idx)
                input_ids = torch.full((len(idx), L), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), L), dtype=torch.long)
                for b, i in enumerate(idx):
                    input_ids[b, :len(rows[i])] = torch.tensor(rows[i])
                    mask[b, :len(rows[i])] = 1
                scores = last_token_scores(self.model, input_ids, mask).cpu().tolist()
                for i, s in zip(idx, scores):
                    out[i] = float(s)
        return out
