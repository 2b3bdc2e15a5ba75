"""FSDP2 (torch `fully_shard`) on gloo ranks: sharded trainer checkpoints and the streamed final
save. accelerate runs no FSDP without GPUs, so tests/test_sharded_checkpoints.py runs this under
torchrun, once per phase:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp2_checkpoint_worker.py PHASE MODEL_DIR OUT_DIR

- `straight`: STEPS optimizer steps uninterrupted, then the final model saved by
  `gather.save_final_model` (streamed) and, for comparison, by a full gather on rank 0; the
  streamed save also into several shards; a LoRA model trained the same way; a LoRA model and
  a reward model streamed beside their reference saves.
- `first`: SAVE_AT steps (a full model, and a LoRA model), a checkpoint saved the way the Trainer saves one under FSDP
  (accelerate's save_fsdp_model / save_fsdp_optimizer with the plugin posttrain's
  `sharded_fsdp_checkpoints` set up, the scheduler on rank 0, posttrain's COMPLETE marker),
  one more step and a checkpoint left unmarked (killed while saving); the process ends there.
- `resume`: `last_complete_checkpoint`, loaded the way the Trainer resumes under FSDP, the
  remaining steps, the final model streamed; and, as a control, the same from the model's
  shards alone (a fresh optimizer and scheduler), which must not match.

Every rank counts the full tensors it gathers (`DTensor.full_tensor`) and the bytes of those
alive at once (a finalizer per tensor: what the code holds, not the process's RSS); rank 0
writes OUT_DIR/<phase>.json.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import weakref
from pathlib import Path
from types import SimpleNamespace

STEPS = 4
SAVE_AT = 2
ROWS = 4  # global batch: each of 2 ranks takes 2 rows


class Meter:
    """Counts DTensor.full_tensor calls and the bytes of the full tensors they returned that are
    still alive; `peak` is the most alive at once since the last reset."""

    def __init__(self):
        self.calls = self.live = self.peak = 0

    def reset(self):
        self.calls, self.peak = 0, self.live

    def _freed(self, n):
        self.live -= n

    def install(self):
        from torch.distributed.tensor import DTensor

        original, meter = DTensor.full_tensor, self

        def full_tensor(dtensor, *args, **kwargs):
            t = original(dtensor, *args, **kwargs)
            n = t.numel() * t.element_size()
            meter.calls += 1
            meter.live += n
            meter.peak = max(meter.peak, meter.live)
            weakref.finalize(t, meter._freed, n)
            return t

        DTensor.full_tensor = full_tensor

    def snapshot(self):
        return {"calls": self.calls, "peak_bytes": self.peak}


def main(phase: str, model_dir: str, out_dir: str) -> int:
    import torch
    import torch.distributed as dist
    from accelerate.utils import (FullyShardedDataParallelPlugin, load_fsdp_model, load_fsdp_optimizer,
                                  save_fsdp_model, save_fsdp_optimizer)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    from transformers.distributed.fsdp import get_fsdp_ckpt_kwargs

    from posttrain import gather, training
    from posttrain.modeling import load_tokenizer, save_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from accelerate import PartialState

    PartialState()  # accelerate's checkpoint functions log through it (the Trainer has made one)
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    out, work = Path(out_dir), Path(out_dir) / "work"
    tok = load_tokenizer(model_dir)
    meter = Meter()
    meter.install()
    result: dict = {}

    def per_rank(value):
        values = [None] * world
        dist.all_gather_object(values, value)
        return values

    def shard(model, layers):
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def build(lora=False):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if lora:  # the adapters trained (their init seeded alike on every rank and every run), the base frozen
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(3)
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0))
        shard(model, model.get_base_model().model.layers if lora else model.model.layers)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / STEPS)
        return model, opt, sched

    def train_step(model, opt, sched, step):
        # The same global batch for a step whether or not the run was interrupted; rank r its rows.
        g = torch.Generator().manual_seed(1000 + step)
        ids = torch.randint(3, model.config.vocab_size, (ROWS, 12), generator=g)
        mine = ids[rank * ROWS // world:(rank + 1) * ROWS // world]
        model(input_ids=mine, labels=mine).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()

    def fake_trainer(model):  # what save_final_model reads of a Trainer
        return SimpleNamespace(model=model, model_wrapped=model, is_deepspeed_enabled=False,
                               accelerator=SimpleNamespace(unwrap_model=lambda m: m,
                                                           state=SimpleNamespace(deepspeed_plugin=None)))

    # The plugin the old configs/accelerate/fsdp2.yaml gave (FULL_STATE_DICT), as the trainer holds
    # it, after posttrain's callback has made it sharded; and the accelerator fields its saves read.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
    result["plugin_changed"] = training.sharded_fsdp_checkpoints(plugin)
    result["plugin_state_dict_type"] = str(plugin.state_dict_type)
    accel = SimpleNamespace(num_processes=world, process_index=rank, is_main_process=rank == 0, is_fsdp2=True,
                            wait_for_everyone=dist.barrier)
    marker = training.complete_marker_callback()

    def save_like_trainer(model, opt, sched, step, work, *, complete=True):
        """Trainer._save_checkpoint under FSDP: the model (a LoRA model: its adapters) and the
        optimizer through accelerate, the scheduler on rank 0, then the callbacks' on_save on
        every rank."""
        ckpt = work / f"checkpoint-{step}"
        save_fsdp_model(plugin, accel, model, str(ckpt), **get_fsdp_ckpt_kwargs())
        if not complete:
            return ckpt  # killed here: no optimizer, no marker
        save_fsdp_optimizer(plugin, accel, opt, model, str(ckpt))
        if rank == 0:
            torch.save(sched.state_dict(), ckpt / "scheduler.pt")
        if rank == 1:
            time.sleep(1.0)  # a slow rank: the marker must wait for its RNG file
        torch.save({"cpu": torch.random.get_rng_state()}, ckpt / f"rng_state_{rank}.pth")
        marker.on_save(SimpleNamespace(output_dir=str(work)),
                       SimpleNamespace(global_step=step, is_world_process_zero=rank == 0), None)
        return ckpt

    try:
        if phase == "straight":
            model, opt, sched = build()
            for step in range(1, STEPS + 1):
                train_step(model, opt, sched, step)
            meter.reset()
            gather.save_final_model(fake_trainer(model), tok, out / "straight")
            result["stream_meter"] = per_rank(meter.snapshot())
            full = {k: v for k, v in model.state_dict().items()}
            result["largest_tensor_bytes"] = max(v.numel() * v.element_size() for v in full.values())
            result["model_bytes"] = sum(v.numel() * v.element_size() for k, v in full.items() if k != "lm_head.weight")
            meter.reset()
            state = gather.full_state_dict(model)  # the gather the streamed save replaces
            result["gather_meter"] = per_rank(meter.snapshot())
            distinct = {v.data_ptr(): v.numel() * v.element_size() for v in state.values()}
            result["gather_held_bytes"] = per_rank(sum(distinct.values()))
            plain = gather.plain_copy(model, state) if rank == 0 else None
            save_checkpoint(plain, tok, out / "gathered")
            del state, plain
            gather.stream_save(model, tok, out / "straight_shards", max_shard_size=200_000)
            model, opt, sched = build(lora=True)
            for step in range(1, STEPS + 1):
                train_step(model, opt, sched, step)
            gather.save_final_model(fake_trainer(model), tok, out / "lora_trained")

            # LoRA: streamed and merged on the way vs peft's merge_and_unload of the same model unsharded.
            from peft import LoraConfig, get_peft_model

            def lora_model():
                torch.manual_seed(0)
                base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
                peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj", "down_proj"]))
                torch.manual_seed(1)
                for n, p in peft.named_parameters():
                    if "lora_B" in n:  # zero at init: make the merge change something
                        torch.nn.init.normal_(p, std=0.02)
                return peft

            ref = lora_model().merge_and_unload() if rank == 0 else None
            save_checkpoint(ref, tok, out / "lora_reference")
            peft = lora_model()
            shard(peft, peft.base_model.model.model.layers)
            meter.reset()
            gather.save_final_model(fake_trainer(peft), tok, out / "lora_streamed")
            result["lora_meter"] = per_rank(meter.snapshot())

            # A reward model (a score head, no tied weights), with the stage's `prepare`.
            from posttrain.stages import rm

            def reward_model():
                m = rm.load_reward_model(model_dir)
                m.config.pad_token_id = None  # set by `prepare`, as the rm stage's save does
                torch.manual_seed(2)  # the same trained-looking head on every rank
                torch.nn.init.normal_(m.score.weight, std=0.02)
                return m

            ref = reward_model() if rank == 0 else None
            if ref is not None:
                ref.config.pad_token_id = tok.pad_token_id
            save_checkpoint(ref, tok, out / "rm_reference")
            m = reward_model()
            shard(m, m.model.layers)
            gather.save_final_model(fake_trainer(m), tok, out / "rm_streamed",
                                    prepare=lambda x: setattr(x.config, "pad_token_id", tok.pad_token_id))

        elif phase == "first":
            for kind in ("full", "lora"):
                model, opt, sched = build(lora=kind == "lora")
                for step in range(1, SAVE_AT + 1):
                    train_step(model, opt, sched, step)
                meter.reset()
                save_like_trainer(model, opt, sched, SAVE_AT, work / kind)
                result[f"{kind}_save_meter"] = per_rank(meter.snapshot())
                train_step(model, opt, sched, SAVE_AT + 1)
                save_like_trainer(model, opt, sched, SAVE_AT + 1, work / kind, complete=False)

        elif phase == "resume":
            for kind in ("full", "lora"):
                ckpt = training.last_complete_checkpoint(work / kind)
                result[f"{kind}_resumed_from"] = Path(ckpt).name if ckpt else None
                model, opt, sched = build(lora=kind == "lora")
                meter.reset()
                load_fsdp_model(plugin, accel, model, ckpt, **get_fsdp_ckpt_kwargs())
                load_fsdp_optimizer(plugin, accel, opt, model, ckpt, **get_fsdp_ckpt_kwargs())
                sched.load_state_dict(torch.load(Path(ckpt) / "scheduler.pt", weights_only=True))
                result[f"{kind}_load_meter"] = per_rank(meter.snapshot())
                done = int(Path(ckpt).name.split("-")[1])
                for step in range(done + 1, STEPS + 1):
                    train_step(model, opt, sched, step)
                name = "resumed" if kind == "full" else "lora_resumed"
                gather.save_final_model(fake_trainer(model), tok, out / name)
            # The control: the same resume without the optimizer's and scheduler's state must differ.
            ckpt = training.last_complete_checkpoint(work / "full")
            model, opt, sched = build()
            load_fsdp_model(plugin, accel, model, ckpt, **get_fsdp_ckpt_kwargs())
            for step in range(done + 1, STEPS + 1):
                train_step(model, opt, sched, step)
            gather.save_final_model(fake_trainer(model), tok, out / "resumed_model_only")
        else:
            raise ValueError(f"unknown phase {phase!r}")
    except Exception as err:  # reported to the test, which fails with the traceback
        result["error"] = f"rank {rank}: {type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()[-4000:]
        (out / f"{phase}.rank{rank}.json").write_text(json.dumps(result, indent=1, default=str))
        raise
    dist.barrier()
    if rank == 0:
        (out / f"{phase}.json").write_text(json.dumps(result, indent=1, default=str))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3]))
