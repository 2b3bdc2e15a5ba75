"""Atomic writes end with the permissions the umask gives, so a team can read a run's outputs."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from posttrain.files import atomic_dir, atomic_write_json, atomic_write_text, current_umask, write_jsonl


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                        (0o077, 0o600, 0o700)])
def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    write_jsonl(tmp_path / "c.jsonl", [{"k": 1}])
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # written 0600 by safetensors
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "f").write_text("x")
    # the same as files and folders made without a temporary name
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    assert _mode(tmp_path / "plain.txt") == file_mode and _mode(tmp_path / "plain") == dir_mode
    for name in ("a.txt", "b.json", "c.jsonl", "model/weights.bin", "model/model.safetensors", "model/sub/f"):
        assert _mode(tmp_path / name) == file_mode, name
    assert _mode(tmp_path / "model") == dir_mode and _mode(tmp_path / "model" / "sub") == dir_mode


def test_a_replaced_folder_follows_the_umask_too(tmp_path, umask):
    umask(0o022)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("1")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("2")
    assert (tmp_path / "out" / "f").read_text() == "2"
    assert _mode(tmp_path / "out") == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
