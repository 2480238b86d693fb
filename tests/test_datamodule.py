"""The Treasure Island DataModule: chapter split, packing and scored evaluation windows."""

from __future__ import annotations

import pytest
import torch

from datamodules.packing import make_eval_windows, pack_into_blocks
from datamodules.treasure_island import TreasureIslandDataModule
from foundation import IGNORE_INDEX, ConfigError
from lightning_modules.tokenizers import load_tokenizer


def test_packing_loses_no_token():
    stream = torch.randint(3, 1000, (1000,))
    for block_size in (1, 7, 64, 999, 1000, 4096):
        packed = pack_into_blocks(stream, block_size, pad_id=0)
        targets = packed["labels"].flatten()
        assert torch.equal(targets[targets != IGNORE_INDEX], stream[1:])
        inputs = packed["input_ids"].flatten()[: stream.numel() - 1]
        assert torch.equal(inputs, stream[:-1])
        padded_rows = (packed["labels"] == IGNORE_INDEX).any(dim=1)
        assert padded_rows.sum() <= 1 and (not padded_rows.any() or bool(padded_rows[-1]))


@pytest.mark.parametrize(("window", "stride"), [(8, 4), (8, 8), (8, 1), (16, 5), (64, 32)])
def test_eval_windows_score_every_token_exactly_once(window, stride):
    tokens = torch.randint(3, 1000, (203,))
    windows = make_eval_windows(tokens, bos_id=1, window=window, stride=stride, pad_id=2)
    labels, inputs = windows["labels"], windows["input_ids"]
    assert torch.equal(labels[labels != IGNORE_INDEX], tokens)
    assert inputs[0, 0] == 1  # the first token is predicted from BOS
    assert labels[0, 0] == tokens[0]
    sequence = torch.cat([torch.tensor([1]), tokens])
    for row in range(len(inputs)):
        start = row * stride
        scored = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        for position in scored.tolist():
            # the input at every position is the true preceding token; the label is the next one
            assert inputs[row, position] == sequence[start + position]
            assert labels[row, position] == sequence[start + position + 1]
        if row > 0 and len(scored):
            assert scored.min() >= window - stride  # at least window - stride tokens of context


def test_held_out_chapters_never_reach_training(book_path, tmp_path):
    datamodule = TreasureIslandDataModule(cache_dir=str(tmp_path), val_chapters=[2, 31], test_chapters=[34])
    datamodule.prepare_data()
    datamodule.setup("fit")
    splits = datamodule.splits
    train_text = splits.text("train")
    assert [c.number for c in splits.chapters["val"]] == [2, 31]
    assert [c.number for c in splits.chapters["test"]] == [34]
    for chapter in splits.chapters["val"] + splits.chapters["test"]:
        paragraphs = [p for p in chapter.text.split("\n\n") if len(p) > 80]
        assert paragraphs
        for paragraph in paragraphs:
            assert paragraph not in train_text
    tok = load_tokenizer("mistral-v1")
    train_tokens = datamodule.datasets["train"].tensors["labels"]
    assert torch.equal(train_tokens[train_tokens != IGNORE_INDEX], torch.tensor(tok.encode(train_text)))


def test_eval_split_scores_the_whole_held_out_text(book_path, tmp_path):
    datamodule = TreasureIslandDataModule(cache_dir=str(tmp_path), block_size=128, eval_stride=48)
    datamodule.prepare_data()
    datamodule.setup("validate")
    tok = load_tokenizer("mistral-v1")
    expected = torch.tensor(tok.encode(datamodule.splits.text("val")))
    labels = datamodule.datasets["val"].tensors["labels"]
    assert torch.equal(labels[labels != IGNORE_INDEX], expected)
    per_window = datamodule.datasets["val"].tensors["scored_bytes"]
    # every byte of the scored text and nothing else (not the space SentencePiece puts before the first word)
    assert int(per_window.sum()) == len(datamodule.splits.text("val").encode("utf-8"))
    assert (per_window > 0).all()


def test_token_cache_is_reused(book_path, tmp_path):
    first = TreasureIslandDataModule(cache_dir=str(tmp_path))
    first.prepare_data()
    first.setup("fit")
    cached = list((tmp_path / "tokens").glob("*.pt"))
    assert len(cached) == 1
    second = TreasureIslandDataModule(cache_dir=str(tmp_path))
    second.setup("fit")
    assert torch.equal(first.datasets["val"].tensors["labels"], second.datasets["val"].tensors["labels"])
    TreasureIslandDataModule(cache_dir=str(tmp_path), block_size=64).setup("fit")
    assert len(list((tmp_path / "tokens").glob("*.pt"))) == 2  # block size is part of the key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "data.batch_size must be >= 1"),
        ({"eval_batch_size": 0}, "data.eval_batch_size must be >= 1"),
        ({"block_size": 1}, "data.block_size must be >= 2"),
        ({"block_size": 64, "eval_stride": 65}, "data.eval_stride must be between 1 and block_size"),
        ({"val_chapters": [3], "test_chapters": [3]}, "in both data.val_chapters and data.test_chapters"),
    ],
)
def test_bad_data_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TreasureIslandDataModule(**kwargs)


def test_chapter_out_of_range_is_refused(book_path, tmp_path):
    datamodule = TreasureIslandDataModule(cache_dir=str(tmp_path), val_chapters=[40])
    with pytest.raises(ConfigError, match=r"names chapters \[40\].*1..34"):
        datamodule.setup("fit")
