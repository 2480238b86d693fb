"""The Treasure Island DataModule: Project Gutenberg eBook #120, split by chapter, tokenized and packed."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from datamodules.gutenberg import (
    BOOK_PATH_ENV,
    TREASURE_ISLAND_URL,
    BookUnavailableError,
    Chapter,
    download_book,
    read_utf8_text,
    split_into_chapters,
    strip_gutenberg_boilerplate,
)
from datamodules.packing import make_eval_windows, pack_into_blocks, scored_bytes
from datamodules.token_data import SPLITS, TensorRowsDataset, TokenDataModule
from foundation import ConfigError
from lightning_modules import InputRequirements

__all__ = ["SPLITS", "BookSplits", "TensorRowsDataset", "TreasureIslandDataModule", "assign_chapters"]


@dataclass(frozen=True)
class BookSplits:
    """The book's chapters assigned to train / val / test, and the text of each split."""

    chapters: dict[str, list[Chapter]]

    def text(self, split: str) -> str:
        return "\n\n".join(chapter.text for chapter in self.chapters[split])


def assign_chapters(chapters: list[Chapter], val_chapters: list[int], test_chapters: list[int]) -> BookSplits:
    """Put held-out chapters in val/test and every other chapter in train."""
    numbers = {c.number for c in chapters}
    for name, chosen in (("val_chapters", val_chapters), ("test_chapters", test_chapters)):
        missing = sorted(set(chosen) - numbers)
        if missing:
            raise ConfigError(
                f"data.{name} names chapters {missing}, but the book has chapters "
                f"1..{max(numbers)}; pick numbers in that range."
            )
    held_out = set(val_chapters) | set(test_chapters)
    if not numbers - held_out:
        raise ConfigError(
            f"data.val_chapters and data.test_chapters hold out all {len(numbers)} chapters of the book, leaving "
            "nothing to train on; hold out fewer (the defaults are [31, 32] and [33, 34])."
        )
    return BookSplits(
        chapters={
            "train": [c for c in chapters if c.number not in held_out],
            "val": [c for c in chapters if c.number in set(val_chapters)],
            "test": [c for c in chapters if c.number in set(test_chapters)],
        }
    )


class TreasureIslandDataModule(TokenDataModule):
    """Treasure Island (Project Gutenberg #120), split by chapter into train / val / test.

    Training text is packed into fixed-length blocks (no padding waste). Validation and test
    text is scored with sliding windows in which each token is scored exactly once.

    Args:
        book_path: Local copy of the book. When unset, ``$TREASURE_ISLAND_PATH`` is used, then
            a cached download from Project Gutenberg.
        cache_dir: Folder for the downloaded book and token caches. Unset:
            ``$SMARTER_CACHE_DIR`` or ``~/.cache/scaling-smarter``.
        download_url: Where to download the book from when no local copy is given.
        tokenizer: ``"auto"`` (the model's own tokenizer, or Mistral v1 for presets),
            ``"mistral-v1"``, or a hub id / folder / SentencePiece ``.model`` file.
        block_size: Tokens per training block and per evaluation window.
        eval_stride: Step between evaluation windows; unset means ``block_size // 2``.
        val_chapters: Chapter numbers held out for validation.
        test_chapters: Chapter numbers held out for test.
        batch_size: Training blocks per batch.
        eval_batch_size: Evaluation windows per batch; unset means ``batch_size``.
        num_workers: DataLoader worker processes.
        prompts: Prompts for ``predict``; unset uses a few questions about the book.
        prompts_file: File of prompts for ``predict`` (one per line, or JSON Lines with
            ``prompt``); takes precedence over ``prompts``.
        chat_template: Wrap prompts in Mistral's ``[INST] ... [/INST]`` instruction format.
        seed: Seed of the training order (each epoch is a fresh shuffle of it).
        model_requirements: What the model needs of the text (its tokenizer, maximum positions and
            vocabulary). The ``smarter`` command links it from the model; unset means the Mistral v1
            tokenizer and no length check.
    """

    title = "Treasure Island"
    source_name = "the book"

    def __init__(
        self,
        book_path: str | None = None,
        cache_dir: str | None = None,
        download_url: str = TREASURE_ISLAND_URL,
        tokenizer: str = "auto",
        block_size: int = 256,
        eval_stride: int | None = None,
        val_chapters: list[int] | None = None,
        test_chapters: list[int] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        chat_template: bool = True,
        seed: int = 0,
        model_requirements: InputRequirements | None = None,
    ) -> None:
        val_chapters = [31, 32] if val_chapters is None else list(val_chapters)
        test_chapters = [33, 34] if test_chapters is None else list(test_chapters)
        super().__init__(
            cache_dir=cache_dir,
            tokenizer=tokenizer,
            block_size=block_size,
            eval_stride=eval_stride,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            prompts=prompts,
            prompts_file=prompts_file,
            chat_template=chat_template,
            seed=seed,
            model_requirements=model_requirements,
        )
        if not val_chapters or not test_chapters:
            raise ConfigError("data.val_chapters and data.test_chapters must each name a chapter.")
        if set(val_chapters) & set(test_chapters):
            raise ConfigError(
                f"Chapters {sorted(set(val_chapters) & set(test_chapters))} are in both "
                "data.val_chapters and data.test_chapters; hold each out once."
            )
        self.save_hyperparameters()
        self.book_path = book_path
        self.download_url = download_url
        self.val_chapters = val_chapters
        self.test_chapters = test_chapters
        self.splits: BookSplits | None = None

    # ---- locating the book -------------------------------------------------------------
    def _given_book_path(self) -> Path | None:
        for origin, value in (
            ("data.book_path", self.book_path),
            (BOOK_PATH_ENV, os.environ.get(BOOK_PATH_ENV)),
        ):
            if value:
                path = Path(value).expanduser()
                if not path.is_file():
                    raise ConfigError(
                        f"{origin}={value!r} is not a file; point it at the book's plain text "
                        f"(pg120.txt) or unset it to download from {self.download_url}."
                    )
                return path
        return None

    @property
    def downloaded_book_path(self) -> Path:
        return self.cache_dir / "pg120.txt"

    def book_file(self) -> Path:
        """The book's file on disk (a given path, or the cached download)."""
        given = self._given_book_path()
        if given is not None:
            return given
        if not self.downloaded_book_path.is_file():
            raise BookUnavailableError(
                f"The book is not at {self.downloaded_book_path} and was not downloaded; run "
                f"prepare_data() first, or set data.book_path / {BOOK_PATH_ENV} to a local copy."
            )
        return self.downloaded_book_path

    def prepare_data(self) -> None:
        """Download the book once (first process only) unless a local copy is given."""
        if self.trainer is not None and getattr(self.trainer.state.fn, "value", None) == "predict":
            return  # prompts need no book
        if self._given_book_path() is None and not self.downloaded_book_path.is_file():
            download_book(self.download_url, self.downloaded_book_path)

    def load_splits(self) -> BookSplits:
        """Read, clean and split the book by chapter."""
        if self.splits is None:
            book = strip_gutenberg_boilerplate(read_utf8_text(self.book_file()))
            self.splits = assign_chapters(split_into_chapters(book), self.val_chapters, self.test_chapters)
        return self.splits

    load_source = load_splits

    def cache_spec(self) -> dict:
        texts = [self.load_splits().text(name) for name in SPLITS]
        return {
            "text": hashlib.sha256("\x1e".join(texts).encode()).hexdigest(),
            "val": self.val_chapters,
            "test": self.test_chapters,
            "format": 3,
        }

    def build_split_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tokenize each split and pack (train) or window (val/test) it."""
        splits = self.load_splits()
        texts = {name: splits.text(name) for name in SPLITS}
        tok = self.tokenizer
        byte_lengths = torch.tensor(tok.token_byte_lengths(), dtype=torch.long)
        pad_id = tok.eos_id
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        train_stream = torch.tensor([tok.bos_id, *tok.encode(texts["train"])], dtype=torch.long)
        tensors["train"] = pack_into_blocks(train_stream, self.block_size, pad_id)
        for name in ("val", "test"):
            tokens = torch.tensor(tok.encode(texts[name]), dtype=torch.long)
            windows = make_eval_windows(tokens, tok.bos_id, self.block_size, self.eval_stride, pad_id)
            windows["scored_bytes"] = scored_bytes(windows["labels"], byte_lengths, len(texts[name].encode("utf-8")))
            tensors[name] = windows
        return tensors
