"""Shared fixtures: tiny in-process models, no network, few threads."""

from __future__ import annotations

import os

# No model hub, ever: a hub lookup would hang for about a minute before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("POSTTRAIN_PROGRESS", "0")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    os.environ.setdefault("HF_HOME", str(root / "hf"))
    os.environ.setdefault("POSTTRAIN_CACHE", str(root / "posttrain"))
    import torch

    # Tiny models gain nothing from a second thread, and on a busy 2-core machine two threads
    # per process made training about 10x slower (measured while building the world).
    torch.set_num_threads(1)
    yield


class _FinishedEngine:
    """What `generation.start_engine` returns when the engine already ran in this process."""

    returncode = 0

    def poll(self):
        return 0

    def kill(self):
        pass

    def wait(self):
        return 0


@pytest.fixture
def engines_here(monkeypatch):
    """Generation engines run in this process, not in a child (whose start-up costs seconds):
    the same requests, engine and result files (`generation.start_engine` replaced; the
    child-process path is tested in test_generation)."""
    import json
    from pathlib import Path

    from posttrain import generation

    def start_engine(python, request, env, log):
        generation.run_engine(json.loads(Path(request).read_text()))
        return _FinishedEngine()

    monkeypatch.setattr(generation, "start_engine", start_engine)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from posttrain.world.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved random tiny Llama (safetensors + tokenizer). Treat as read-only."""
    from posttrain.modeling import save_checkpoint
    from posttrain.world.tiny import make_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    save_checkpoint(make_tiny_model(tiny_tokenizer, seed=0), tiny_tokenizer, out)
    return out
