"""Model FLOPs per token from the model's shape: the counting rule behind tokens/s → MFU.

Counted (a multiply-add is 2 FLOPs):

- matmuls: ``2 * P`` per token forward, where ``P`` is the number of weights in every linear layer
  (attention and MLP projections in all layers, plus the LM head; embeddings are lookups, not
  matmuls);
- attention scores and values: ``4 * layers * heads * head_dim * context`` per token forward
  (``QK^T`` and ``AV``), with ``context`` the mean number of attended positions, ``(seq + 1) / 2``
  under a causal mask;
- backward: full training adds 2x forward (input and weight gradients); LoRA training adds 1x
  forward for input gradients through the frozen weights, and the adapters' own work
  (``6 * P_lora``: forward, input and weight gradients);
- not counted: norms, activations, softmax, rotary embeddings, the loss, dequantization, and
  activation recomputation (gradient checkpointing), so MFU is "model FLOPs utilisation".
"""

from __future__ import annotations

from typing import Literal

Mode = Literal["inference", "train-full", "train-lora"]

# Dense bf16 peak of one GPU (TFLOP/s, no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def linear_weights(config) -> int:
    """Weights in every linear layer of a Mistral-style decoder, LM head included."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    mlp = 3 * hidden * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + hidden * config.vocab_size


def flops_per_token(config, seq_len: int, mode: Mode = "inference", lora_weights: int = 0) -> float:
    """Model FLOPs per token (see the module docstring for what is counted).

    Args:
        config: The model's config (hidden size, layers, heads, vocab).
        seq_len: Tokens per sequence (sets the mean causal attention context).
        mode: ``inference`` (forward only), ``train-full`` or ``train-lora``.
        lora_weights: Number of LoRA adapter weights (A and B), for ``train-lora``.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    context = (seq_len + 1) / 2
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
    forward = 2 * linear_weights(config) + attention
    if mode == "inference":
        return forward
    if mode == "train-full":
        return 3 * forward
    return 2 * forward + 6 * lora_weights


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak for a known GPU name, else None."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None
