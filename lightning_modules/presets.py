"""Named Mistral shapes with random weights, cached on disk like a real checkpoint folder.

Compute and memory do not depend on weight values, so a preset gives true speed and memory
figures without downloading anything. A preset is written once as a Hugging Face folder and
then loaded through exactly the same path as real weights (quantization included).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from foundation import atomic_path, held_lock

# Mistral-7B-Instruct-v0.2: 7.24 B parameters.
MISTRAL_7B_SHAPE: dict[str, object] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "sliding_window": None,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Runs the whole pipeline on a laptop CPU. Linear sizes are multiples of 128 so that
# bitsandbytes 4-bit works on CPU too.
TINY_SHAPE: dict[str, object] = {
    **MISTRAL_7B_SHAPE,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
}

PRESETS: dict[str, dict[str, object]] = {"tiny": TINY_SHAPE, "mistral-7b": MISTRAL_7B_SHAPE}
PRESET_WEIGHTS_DTYPE = torch.bfloat16


def preset_weights_folder(config, seed: int, cache_dir: Path, device: torch.device | str) -> Path:
    """Write random weights for ``config`` once and return the Hugging Face folder holding them.

    The folder is keyed by the full config, the seed and the device type that drew the numbers,
    and written atomically, so an interrupted write never leaves a half folder behind. Processes that
    need the same folder at once (the ranks of a distributed run) take turns: one writes it, the
    others wait and then read it.

    Args:
        config: A ``MistralConfig``.
        seed: Seed of the random initialisation.
        cache_dir: Root cache folder; weights go under ``presets/``.
        device: Where to draw the weights (a GPU is much faster for 7B shapes).
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    identity = f"{config.to_json_string(use_diff=False)}|seed={seed}|device={device.type}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = cache_dir / "presets" / f"mistral-{key}"
    if (folder / "config.json").is_file():  # present only once the whole folder is in place
        return folder
    with held_lock(folder.with_name(f".{folder.name}.lock"), "the preset weights", wait=True):
        if (folder / "config.json").is_file():  # another process wrote it while this one waited
            return folder
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=PRESET_WEIGHTS_DTYPE)
        # transformers (5.24 at least) writes no file at all from a process of rank > 0 once
        # torch.distributed is initialized; this folder is this process's to write (it holds the lock)
        if hasattr(model, "should_save_on_this_rank"):
            model.should_save_on_this_rank = lambda is_main_process: True
        with atomic_path(folder) as staging:
            model.save_pretrained(staging)
            if not (staging / "config.json").is_file() or not any(staging.glob("*.safetensors")):
                raise RuntimeError(f"writing the preset weights to {staging} left no weights file")
    return folder
