"""What a world is: the settings a build depends on (`WorldConfig`) and a built world's paths (`World`).

`WORLD_VERSION` names the build: bump it when anything that changes a built world changes
(task, config defaults, build code). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain import files

WORLD_VERSION = "4"
"""Bump when anything that changes a built world changes (task, config defaults, build code)."""


@dataclass(frozen=True)
class WorldConfig:
    """Everything a world build depends on besides the seed. Defaults make the demo world."""

    # Data sizes.
    n_train_prompts: int = 512
    n_heldout_prompts: int = 128
    n_sft_seed: int = 64
    n_pref_prompts_per_round: int = 192
    """Prompts annotated per round; ties are dropped, so a batch has somewhat fewer rows."""
    n_heldout_pref_prompts: int = 128
    rounds: int = 6

    # Simulated annotation.
    annotation_temperatures: tuple[float, float] = (0.7, 1.3)
    """The two sampling setups whose responses annotators compare."""
    edit_share: float = 0.3
    """Share of rows (whose chosen answer is not already right) that get an `edited` answer."""
    strength_thresholds: tuple[float, float, float] = (0.5, 0.25, 0.1)
    """Score gaps at or above which a pair is significantly_better, better, slightly_better;
    any smaller positive gap is marginally_better; a zero gap (tie) is dropped."""

    # Tokenizer and model.
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1

    # Pre-training on noisy transcripts.
    n_transcripts: int = 8192
    echo_share: float = 0.35
    """Share of transcripts whose answer just repeats the list unsorted: a systematic failure
    that competes with sorting even under greedy decoding."""
    corrupt_share: float = 0.35
    """Share of transcripts whose sorted answer has 1 to 3 random edits."""
    pretrain_steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30

    # Measuring the base model (recorded in world.json).
    eval_temperature: float = 1.0
    eval_samples: int = 4
    max_new_tokens: int = 24

    # Opt-in noise that gives data curation (posttrain.stages.curate) something real to clean. Off
    # in the default world, whose files (and world.json) stay byte for byte what they were.
    sft_noisy_share: float = 0.0
    """Share of seed SFT rows whose writer wrapped the right answer in an apology, exclamation
    marks or emojis ("I'm sorry! 2 4 7 9 😊😊"): what report 4.2.3's rule-based cleaning
    removes. The task's checker gives such an answer no credit, so training on it hurts."""
    sft_duplicate_share: float = 0.0
    """Share of extra seed SFT rows that repeat an earlier seed row with the numbers of its
    prompt shuffled: near-duplicate dialogs for semantic dedup."""

    def manifest_config(self) -> dict[str, Any]:
        """The config as world.json records it: the opt-in fields only when they are on, so a
        default world's manifest is the same as before they existed."""
        d = asdict(self)
        for name in OPT_IN_FIELDS:
            if d[name] == 0:
                del d[name]
        return d

    def key(self) -> str:
        """'' for the default config, else a short hash: part of the cache folder's name."""
        if self == WorldConfig():
            return ""
        return hashlib.sha256(json.dumps(self.manifest_config(), sort_keys=True).encode()).hexdigest()[:10]


OPT_IN_FIELDS = ("sft_noisy_share", "sft_duplicate_share")


@dataclass(frozen=True)
class World:
    """Absolute paths of a built world."""

    root: Path
    base_model: Path
    sft_seed: Path
    train_prompts: Path
    heldout_prompts: Path
    preference_rounds: tuple[Path, ...]
    heldout_preferences: Path
    manifest: Path

    @classmethod
    def at(cls, root: str | os.PathLike, rounds: int) -> World:
        root = Path(root).resolve()
        return cls(
            root=root,
            base_model=root / "base_model",
            sft_seed=root / "sft_seed.jsonl",
            train_prompts=root / "prompts" / "train.jsonl",
            heldout_prompts=root / "prompts" / "heldout.jsonl",
            preference_rounds=tuple(root / "preferences" / f"round_{r:02d}.jsonl"
                                    for r in range(1, rounds + 1)),
            heldout_preferences=root / "preferences" / "heldout.jsonl",
            manifest=root / "world.json",
        )

    def preferences(self, round: int) -> Path:
        """The preference batch annotated in `round` (1-based)."""
        if not 1 <= round <= len(self.preference_rounds):
            raise ValueError(f"this world has preference batches for rounds 1..{len(self.preference_rounds)}, "
                             f"not {round}")
        return self.preference_rounds[round - 1]

    def info(self) -> dict[str, Any]:
        return files.read_json(self.manifest)
