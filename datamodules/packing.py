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
    inputs, labels = [], []
    for window_inputs, window_labels in eval_segments(tokens, bos_id, window, stride):
        n_in = window_inputs.numel()
        inputs.append(torch.cat([window_inputs, torch.full((window - n_in,), pad_id, dtype=torch.long)]))
        labels.append(torch.cat([window_labels, torch.full((window - n_in,), IGNORE_INDEX, dtype=torch.long)]))
    return {"input_ids": torch.stack(inputs), "labels": torch.stack(labels)}


def eval_segments(
    tokens: torch.Tensor, bos_id: int, window: int, stride: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The windows of ``make_eval_windows`` without their padding: ``(inputs, labels)`` pairs of equal
    length (at most ``window``), in order."""
    if not 1 <= stride <= window:
        raise ConfigError(f"eval stride must be in [1, window={window}], got {stride}.")
    if tokens.dim() != 1 or tokens.numel() < 1:
        raise ConfigError("make_eval_windows needs a 1-D, non-empty token tensor.")
    sequence = torch.cat([torch.tensor([bos_id], dtype=torch.long), tokens.long()])
    last_target = sequence.numel() - 1  # targets are sequence positions 1..last_target
    segments = []
    scored_until = 0  # last sequence position already scored
    start = 0
    while scored_until < last_target:
        chunk = sequence[start : start + window + 1]
        n_in = min(window, chunk.numel() - 1)
        window_labels = torch.full((n_in,), IGNORE_INDEX, dtype=torch.long)
        # position j predicts sequence[start + j + 1]; score only targets beyond scored_until
        first_new = max(scored_until - start, 0)
        window_labels[first_new:n_in] = chunk[first_new + 1 : n_in + 1]
        scored_until = start + n_in
        segments.append((chunk[:n_in].clone(), window_labels))
        start += stride
    return segments


def pack_segments(
    segments: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Pack whole segments (``(inputs, labels)`` of at most ``block_size`` each) into rows, none split.

    Each segment goes to the fullest row it still fits in (best fit, in the given order), so rows are
    nearly full. ``position_ids`` restart at 0 where each segment starts: the model's attention then stays
    inside every segment, and each segment is scored as if it were alone. The tail of a row is padding
    (labels ``IGNORE_INDEX``) whose positions continue the row's last segment.

    Returns:
        ``input_ids``, ``labels`` and ``position_ids``, each ``(rows, block_size)`` int64.
    """
    import bisect

    rows: list[list[int]] = []  # segment indices of each row
    room: list[tuple[int, int]] = []  # sorted (free positions, row)
    for index, (inputs, _) in enumerate(segments):
        length = inputs.numel()
        if not 1 <= length <= block_size:
            raise ConfigError(f"a packed segment needs 1..{block_size} tokens, got {length}.")
        spot = bisect.bisect_left(room, (length, -1))
        if spot < len(room):
            free, row = room.pop(spot)
        else:
            free, row = block_size, len(rows)
            rows.append([])
        rows[row].append(index)
        if free - length > 0:
            bisect.insort(room, (free - length, row))
    input_ids = torch.full((len(rows), block_size), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), block_size), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), block_size), dtype=torch.long)
    for row, members in enumerate(rows):
        at = 0
        for index in members:
            inputs, targets = segments[index]
            n = inputs.numel()
            input_ids[row, at : at + n] = inputs
            labels[row, at : at + n] = targets
            position_ids[row, at : at + n] = torch.arange(n)
            at += n
        last = position_ids[row, at - 1] if at else -1
        position_ids[row, at:] = last + 1 + torch.arange(block_size - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def positions_restarting_at(input_ids: torch.Tensor, start_id: int) -> torch.Tensor:
    """``position_ids`` for packed rows that restart at 0 at every ``start_id`` token (a document's BOS) and at
    each row's start, so that attention stays inside each document.

    Args:
        input_ids: ``(rows, L)`` packed token ids.
        start_id: The id that opens a document.

    Returns:
        ``(rows, L)`` int64.
    """
    index = torch.arange(input_ids.shape[1]).expand_as(input_ids)  # (rows, L)
    starts = torch.where(input_ids == start_id, index, torch.zeros_like(index))
    return index - torch.cummax(starts, dim=1).values


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
