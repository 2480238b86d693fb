"""What FSDP keeps alive through a step, on CPU: a small LoRA Mistral with every layer recomputed, in one
process without FSDP and in two processes (gloo) under FSDP FULL_SHARD with ``MistralFSDPStrategy``'s wrap
policy (a unit per decoder layer and per adapter matrix). Prints, for the first process, the bytes of
live CPU tensor storage before the step, after the forward, after the backward and after a second step.

    python benchmarks/fsdp_saved_memory.py                 # bf16 base
    python benchmarks/fsdp_saved_memory.py --nf4           # 4-bit base packed in bf16 containers

A diagnostic for the GPU finding in BENCHMARKS.md (FSDP kept more than DDP per GPU): it separates what FSDP
itself keeps from what the GPU run adds (Liger kernels, the fused loss, Lightning's strategy).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = {"num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8}


def live_mib() -> float:
    """MiB of distinct, non-empty CPU tensor storages reachable from Python."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total / 2**20


def one_run(rank: int, world: int, port: int, nf4: bool) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    from callbacks.strategies import decoder_layers_and_trainable_leaves
    from lightning_modules import LoraSettings, MistralModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    quantized = {"quantization": "nf4", "quant_storage": "bfloat16"} if nf4 else {}
    module = MistralModule(
        source="tiny",
        dtype="bfloat16",
        preset_overrides=SHAPE,
        activation_checkpointing="every-layer",
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        **quantized,
    )
    module.configure_model()
    model = module.model
    if world > 1:
        model = FullyShardedDataParallel(
            model,
            auto_wrap_policy=decoder_layers_and_trainable_leaves,
            use_orig_params=True,
            device_id=torch.device("cpu"),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
        )
    ids = torch.randint(0, 1000, (2, 256), generator=torch.Generator().manual_seed(rank))
    figures = {}
    gc.collect()
    figures["before"] = live_mib()
    loss = model(input_ids=ids).logits.float().mean()
    gc.collect()
    figures["after forward"] = live_mib()
    loss.backward()
    del loss
    gc.collect()
    figures["after backward"] = live_mib()
    model(input_ids=ids).logits.float().mean().backward()
    gc.collect()
    figures["after a second step"] = live_mib()
    if rank == 0:
        start = figures.pop("before")
        changes = ", ".join(f"{name} {value - start:+.1f}" for name, value in figures.items())
        print(
            f"{'FSDP, 2 processes' if world > 1 else 'one process, no FSDP'}: {start:.1f} MiB at the start; {changes}"
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nf4", action="store_true", help="4-bit base in bf16 containers")
    args = parser.parse_args()
    for world in (1, 2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        mp.spawn(one_run, args=(world, port, args.nf4), nprocs=world)


if __name__ == "__main__":
    main()
