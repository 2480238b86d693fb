"""Turning token streams into training blocks and scored evaluation windows.

Both produce ``input_ids`` and already-shifted ``labels`` of the same length:
``labels[j]`` is the token that position ``j`` must predict, or ``IGNORE_INDEX`` where nothing is scored.
"""

from __future__ import annotations

import torch

from foundation import IGNORE_INDEX, ConfigError


def pack_into_blocks(stream: torch.Tensor, block_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Cut a token stream into fixed-length blocks with no padding but in the last one.

    Block ``i`` reads ``stream[i*L : i*L+L]`` and predicts ``stream[i*L+1 : i*L+L+1]``, so every
    token after the first is a target exactly once; the last block is padded (labels ``IGNORE_INDEX``).

    Args:
        stream: 1-D token ids.
        block_size: Tokens per block (``L``).
        pad_id: Id written into the padded tail of the last block.

    Returns:
        ``input_ids`` and ``labels``, each ``(num_blocks, block_size)`` int64.
    """
    if stream.dim() != 1 or stream.numel() < 2:
        raise ConfigError("pack_into_blocks needs a 1-D stream of at least two tokens.")
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}.")
    num_targets = stream.numel() - 1
    num_blocks = -(-num_targets // block_size)
    padded_len = num_blocks * block_size + 1
    padded = torch.full((padded_len,), IGNORE_INDEX, dtype=torch.long)
    padded[: stream.numel()] = stream
    input_ids = padded[:-1].view(num_blocks, block_size).clone()  # (blocks, L)
    labels = padded[1:].view(num_blocks, block_size).clone()  # (blocks, L)
    input_ids[input_ids == IGNORE_INDEX] = pad_id
    return {"input_ids": input_ids, "labels": labels}


def make_eval_windows(
    tokens: torch.Tensor, bos_id: int, window: int, stride: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Sliding windows over ``[BOS] + tokens`` in which every token is scored exactly once.

    Window ``k`` starts at ``k * stride`` and scores only the targets no earlier window scored,
    so each scored token (after the first window) sees at least ``window - stride`` tokens
    of context. The first token is predicted from BOS alone.

    Args:
        tokens: 1-D token ids of the held-out text (no BOS).
        bos_id: Id prepended to the text.
        window: Tokens the model reads per window.
        stride: Step between window starts; ``1 <= stride <= window``.
        pad_id: Id written into the padded tail of the last window.

    Returns:
        ``input_ids`` and ``labels``, each ``(num_windows, window)`` int64.
    """
    if not 1 <= stride <= window:
        raise ConfigError(f"eval stride must be in [1, window={window}], got {stride}.")
    if tokens.dim() != 1 or tokens.numel() < 1:
        raise ConfigError("make_eval_windows needs a 1-D, non-empty token tensor.")
    sequence = torch.cat([torch.tensor([bos_id], dtype=torch.long), tokens.long()])
    last_target = sequence.numel() - 1  # targets are sequence positions 1..last_target
    inputs, labels = [], []
    scored_until = 0  # last sequence position already scored
    start = 0
    while scored_until < last_target:
        chunk = sequence[start : start + window + 1]
        window_inputs = torch.full((window,), pad_id, dtype=torch.long)
        window_labels = torch.full((window,), IGNORE_INDEX, dtype=torch.long)
        n_in = min(window, chunk.numel() - 1)
        window_inputs[:n_in] = chunk[:n_in]
        # position j predicts sequence[start + j + 1]; score only targets beyond scored_until
        first_new = max(scored_until - start, 0)
        window_labels[first_new:n_in] = chunk[first_new + 1 : n_in + 1]
        scored_until = start + n_in
        inputs.append(window_inputs)
        labels.append(window_labels)
        start += stride
    return {"input_ids": torch.stack(inputs), "labels": torch.stack(labels)}


def scored_bytes(labels: torch.Tensor, byte_lengths: torch.Tensor, text_bytes: int | None = None) -> torch.Tensor:
    """UTF-8 bytes of the scored targets of each row of ``labels``.

    Token byte lengths do not always add up to the text: SentencePiece writes a ``▁`` (a space) in
    front of the first token that the text does not hold, and a normalizing tokenizer may fold
    characters. With ``text_bytes`` (the UTF-8 length of the text the rows score, every token once)
    the difference is settled on the row that scores the first token, so the total is the text's own.

    Args:
        labels: ``(rows, L)`` targets with ``IGNORE_INDEX`` where unscored.
        byte_lengths: ``(vocab,)`` bytes each token id stands for.
        text_bytes: UTF-8 bytes of the scored text, when the rows score all of it.

    Returns:
        ``(rows,)`` int64 byte counts.
    """
    scored = labels != IGNORE_INDEX
    safe = torch.where(scored, labels, torch.zeros_like(labels))
    per_row = (byte_lengths[safe] * scored).sum(dim=1)
    if text_bytes is not None and len(per_row):
        first_row = int(scored.any(dim=1).nonzero()[0])
        per_row[first_row] += text_bytes - int(per_row.sum())
    return per_row
