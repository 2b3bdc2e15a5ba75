"""GPU assignment for every form CUDA_VISIBLE_DEVICES takes: indices, UUIDs, MIG, empty, unset."""

from __future__ import annotations

import pytest

from posttrain import generation, gpus
from posttrain.gpus import GPUAssignmentError, assign, parse_visible, visible_devices

UUID_A = "GPU-8f2a6c1e-3b4d-4e5f-9a0b-1c2d3e4f5a6b"
UUID_B = "GPU-0d1c2b3a-4f5e-6d7c-8b9a-0f1e2d3c4b5a"
MIG_A = "MIG-5c4b3a29-1807-5f6e-8d7c-6b5a49382716"
MIG_B = "MIG-1a2b3c4d-5e6f-5a7b-8c9d-0e1f2a3b4c5d"
MIG_LEGACY = "MIG-GPU-8f2a6c1e-3b4d-4e5f-9a0b-1c2d3e4f5a6b/1/0"


def never_called():
    raise AssertionError("the GPUs must not be counted when CUDA_VISIBLE_DEVICES is set")


@pytest.mark.parametrize("value, expected", [
    ("0,1,3", ["0", "1", "3"]),
    (" 2 , 01", ["2", "1"]),  # CUDA reads "01" as device 1
    (f"{UUID_A},{UUID_B}", [UUID_A, UUID_B]),
    ("GPU-8f2a", ["GPU-8f2a"]),  # a unique UUID prefix is enough for CUDA
    (f"{MIG_A},{MIG_B}", [MIG_A, MIG_B]),
    (MIG_LEGACY, [MIG_LEGACY]),
    (f"0,{UUID_A}", ["0", UUID_A]),
    ("", []),  # no GPU at all
    ("-1", []),
    ("0,1,-1,2", ["0", "1"]),  # CUDA stops at the first invalid entry
    ("NoDevFiles", []),
])
def test_parse_every_form(value, expected):
    assert parse_visible(value) == expected
    assert visible_devices({"CUDA_VISIBLE_DEVICES": value}, counters=(never_called,)) == expected


def test_unset_counts_with_torch_then_nvidia_smi_then_none():
    # torch has CUDA: its count wins
    assert visible_devices({}, counters=(lambda: 2, never_called)) == ["0", "1"]
    # a CPU build of torch (the orchestrator's env; vLLM lives in another) does not answer,
    # nvidia-smi does: the old code returned [] here and put every engine on GPU 0
    assert visible_devices({}, counters=(lambda: None, lambda: 4)) == ["0", "1", "2", "3"]
    # nothing answers: no GPU
    assert visible_devices({}, counters=(lambda: None, lambda: None)) == []


def test_unset_on_this_machine_is_a_list_of_indices():
    found = visible_devices({})
    assert all(d.isdigit() for d in found) and found == [str(i) for i in range(len(found))]


def test_assign_gives_disjoint_slices_in_the_given_form():
    assert assign(["0", "1", "2", "3"], 2, 2) == [["0", "1"], ["2", "3"]]
    assert assign([UUID_A, UUID_B], 2, 1) == [[UUID_A], [UUID_B]]
    assert assign([MIG_A, MIG_B], 2, 1) == [[MIG_A], [MIG_B]]
    assert assign(["0", "1", "2"], 1, 2) == [["0", "1"]]  # spare GPUs stay unused
    assert assign([], 4, 2) is None  # no GPU: the engines run on CPU


def test_assign_refuses_too_few_and_tensor_parallel_over_mig():
    with pytest.raises(GPUAssignmentError, match=r"2 engine\(s\) x 2 GPU\(s\) need 4 GPUs, 3 visible: 0,1,2"):
        assign(["0", "1", "2"], 2, 2)
    with pytest.raises(GPUAssignmentError, match="MIG"):
        assign([MIG_A, MIG_B], 1, 2)
    with pytest.raises(ValueError):
        assign(["0"], 0, 1)


@pytest.mark.parametrize("value, per_engine", [
    ("4,5,6,7", [["4", "5"], ["6", "7"]]),
    (f"{UUID_A},{UUID_B},GPU-aa,GPU-bb", [[UUID_A, UUID_B], ["GPU-aa", "GPU-bb"]]),
])
def test_engine_children_get_the_same_form_they_were_handed(monkeypatch, tmp_path, value, per_engine):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assigned = generation._engine_gpus(2, 2)
    assert assigned == per_engine
    envs = [generation._child_env("vllm", tmp_path, g)["CUDA_VISIBLE_DEVICES"] for g in assigned]
    assert envs == [",".join(g) for g in per_engine]


def test_engine_children_on_mig_and_too_few_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{MIG_A},{MIG_B}")
    assert generation._engine_gpus(2, 1) == [[MIG_A], [MIG_B]]
    with pytest.raises(generation.GenerationError, match="MIG"):
        generation._engine_gpus(1 + 1, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(generation.GenerationError, match="need 2 GPUs, 1 visible"):
        generation._engine_gpus(2, 1)
    # one engine inherits this process's devices untouched
    assert generation._engine_gpus(1, 4) is None


def test_unset_with_cpu_torch_counts_with_nvidia_smi(monkeypatch, tmp_path):
    """No CUDA_VISIBLE_DEVICES, a CPU torch, and an nvidia-smi on PATH that sees two GPUs
    (a stand-in script printing what `nvidia-smi --query-gpu=index --format=csv,noheader` prints)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=index" ] && printf "0\\n1\\n" && exit 0\nexit 9\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpus, "_count_with_torch", lambda: None)
    assert gpus._count_with_nvidia_smi() == 2
    assert generation._engine_gpus(2, 1) == [["0"], ["1"]]
    with pytest.raises(generation.GenerationError, match="need 4 GPUs, 2 visible"):
        generation._engine_gpus(2, 2)
