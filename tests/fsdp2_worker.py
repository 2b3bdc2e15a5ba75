"""FSDP2 (torch `fully_shard`) on 2 gloo ranks, driven directly: accelerate ignores FSDP on a
machine without GPUs, so tests/test_distributed.py runs this under torchrun instead.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp2_worker.py MODEL_DIR OUT_DIR

Checks, each against the same model unsharded in this process, and writes OUT_DIR/result.json
(rank 0): the packed reward-model forward through the sharded root and its backward; the
gathered full state dict saved with posttrain's save path and loaded back with the base
model's names and shapes; a LoRA model merged from its gathered state before saving.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def main(model_dir: str, out_dir: str) -> int:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from posttrain import distributed, gather

    from posttrain.stages import rm
    from posttrain.modeling import load_tokenizer, save_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = Path(out_dir)
    result: dict = {}

    def shard(model, layers):
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def step(name, fn):
        try:
            result[name] = fn()
        except Exception as err:  # reported to the test, which fails with the traceback
            result[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}

    tok = load_tokenizer(model_dir)

    # -- 1. the packed reward model through the sharded root, forward and backward
    def packed():
        torch.manual_seed(0)
        ref = rm.load_reward_model(model_dir)
        ref.config.pad_token_id = tok.pad_token_id
        model = rm.load_reward_model(model_dir)
        model.load_state_dict(ref.state_dict())
        model.config.pad_token_id = tok.pad_token_id
        items = [rm.EncodedRanking(prompt_ids=[5, 6, 7], response_ids=[[8, 9], [10, 11, 12], [13]],
                                   pairs=[(0, 1), (1, 2), (0, 2)], strengths=[None] * 3),
                 rm.EncodedRanking(prompt_ids=[5, 9], response_ids=[[14, 15, 16], [17]], pairs=[(0, 1)],
                                   strengths=[None])]
        batch = rm.pack_batch(items, tok.pad_token_id)
        shard(model, model.model.layers)
        loss, scores = rm.packed_loss(model, batch)
        loss.backward()
        ref_loss, ref_scores = rm.packed_loss(ref, batch)
        ref_loss.backward()
        grad_diff = 0.0
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grad_diff = max(grad_diff, (g - q.grad).abs().max().item())
        # The full state dict of the trained head model, saved the way save_final_model does.
        state = gather.full_state_dict(model)
        plain = gather.plain_copy(model, state) if distributed.is_main() else None
        save_checkpoint(plain, tok, out / "rm_model")
        return {"sharded": gather.is_sharded(model), "score_diff": (scores - ref_scores).abs().max().item(),
                "loss_diff": abs(loss.item() - ref_loss.item()), "grad_diff": grad_diff}

    step("packed_rm", packed)

    # -- 2. LoRA on a causal LM: gathered, merged on rank 0, saved with the base shapes
    def lora():
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        def build():
            torch.manual_seed(0)
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0))
            torch.manual_seed(1)
            for n, p in peft.named_parameters():
                if "lora_B" in n:  # zero at init: make the merge change something
                    torch.nn.init.normal_(p, std=0.02)
            return peft

        ref = build().merge_and_unload()
        model = build()
        shard(model, model.base_model.model.model.layers)
        state = gather.full_state_dict(model)
        merged = None
        if distributed.is_main():
            merged = gather.plain_copy(model, state).merge_and_unload()
        save_checkpoint(merged, tok, out / "lora_merged")
        if not distributed.is_main():
            return None
        ref_state = ref.state_dict()
        return {"keys_equal": sorted(merged.state_dict()) == sorted(ref_state),
                "weight_diff": max((merged.state_dict()[k] - v).abs().max().item() for k, v in ref_state.items())}

    step("lora", lora)
    dist.barrier()
    if distributed.is_main():
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
