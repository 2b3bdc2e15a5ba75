"""The fence around TRL's and transformers' private internals (posttrain.trl_compat).

These fail loudly when the pinned versions change or a private method we override or call is
gone or has other parameters: update trl_compat (and re-run tests/test_dpo.py) before the pins.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import pytest

from posttrain import trl_compat

ROOT = Path(__file__).resolve().parents[1]


def test_tested_versions_are_the_pinned_and_installed_ones():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements" / "ci.txt").read_text(), re.M))
    for name, version in trl_compat.TESTED_VERSIONS.items():
        assert pins.get(name) == version, (f"requirements/ci.txt pins {name}=={pins.get(name)}, "
                                           f"trl_compat tested {version}")
    assert trl_compat.installed_versions() == trl_compat.TESTED_VERSIONS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trl_compat.check_versions() == {}


def test_every_private_method_we_rely_on_exists_with_the_expected_parameters():
    assert trl_compat.private_api_problems() == []


def test_a_changed_private_method_is_named_and_stops_the_trainer_build(monkeypatch):
    monkeypatch.setitem(trl_compat.PRIVATE_API, "trl:DPOTrainer._no_such_hook", ("self",))
    monkeypatch.setitem(trl_compat.PRIVATE_API, "trl:DPOTrainer._compute_loss", ("self", "model", "batch"))
    monkeypatch.setitem(trl_compat.PRIVATE_SOURCE, "trl:DPOTrainer.__init__", ("self._gone_attribute =",))
    problems = trl_compat.private_api_problems()
    assert len(problems) == 3
    assert any("_no_such_hook: missing" in p for p in problems)
    assert any("_compute_loss: parameters" in p for p in problems)
    assert any("self._gone_attribute" in p for p in problems)
    with pytest.raises(trl_compat.PrivateAPIChanged, match="_no_such_hook"):
        trl_compat.check_private_api()


def test_a_version_mismatch_warns_and_strict_mode_raises(monkeypatch):
    monkeypatch.setitem(trl_compat.TESTED_VERSIONS, "trl", "0.0.1")
    with pytest.warns(trl_compat.VersionMismatchWarning, match=r"trl .* \(tested: 0.0.1\)"):
        assert "trl" in trl_compat.check_versions()
    monkeypatch.setenv("POSTTRAIN_STRICT_VERSIONS", "1")
    with pytest.raises(trl_compat.PrivateAPIChanged, match="tested: 0.0.1"):
        trl_compat.check_versions()


def _private_overrides(cls, bases) -> set[str]:
    """Names `cls` itself defines that are private (single underscore) attributes of one of `bases`."""
    return {name for name in vars(cls) if name.startswith("_") and not name.startswith("__")
            and any(hasattr(b, name) for b in bases)}


def test_every_private_override_lives_in_the_fence_and_is_listed():
    from transformers import Trainer
    from transformers.cache_utils import DynamicLayer
    from trl import DPOTrainer

    from posttrain.stages import dpo

    base = trl_compat.dpo_trainer_base()
    listed = {k.split(":")[1].split(".")[1] for k in trl_compat.PRIVATE_API if k.startswith("trl:DPOTrainer.")}
    assert _private_overrides(base, (DPOTrainer, Trainer)) <= listed
    # posttrain.stages.dpo's trainer overrides no private TRL / transformers method itself
    trainer = dpo.masked_dpo_trainer_class()
    assert trainer.__mro__[1] is base
    assert _private_overrides(trainer, (DPOTrainer, Trainer)) == set()
    # and production code patches nothing with unittest.mock
    for path in (ROOT / "posttrain").rglob("*.py"):
        assert "unittest" not in path.read_text(), f"{path} imports unittest in production code"
    # the KV-cache layer overrides only the DynamicLayer methods listed
    from posttrain.world.tiny import build_tokenizer, make_tiny_model

    cache = trl_compat.preallocated_cache(make_tiny_model(build_tokenizer()), extra=4)
    layer_cls = cache.layer_class_to_replicate
    overridden = {n for n in vars(layer_cls) if callable(getattr(layer_cls, n)) and hasattr(DynamicLayer, n)
                  and n != "__init__"}
    listed_cache = {k.split(".")[-1] for k in trl_compat.PRIVATE_API if ":DynamicLayer." in k}
    assert overridden <= listed_cache


def test_the_model_hash_is_skipped_only_while_the_trainer_is_built():
    import trl.trainer.dpo_trainer as module

    original = module.hash_module
    with trl_compat._skipped_model_hash():
        assert module.hash_module is not original
        assert module.hash_module(object()).startswith("not-hashed")
    assert module.hash_module is original
    with pytest.raises(KeyError), trl_compat._skipped_model_hash():
        raise KeyError("an error inside still restores it")
    assert module.hash_module is original
    assert "hash_module(" in inspect.getsource(module.DPOTrainer.__init__)
