"""The Treasure Island DataModule: Project Gutenberg eBook #120, split by chapter, tokenized and packed."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

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
from datamodules.prompts import DEFAULT_PROMPTS, instruction_text, read_prompts_file
from datamodules.sampling import EpochShuffleSampler, ResumableDataLoader, unrepeated_sampler
from foundation import (
    CACHE_FOLDER_SETTING,
    IGNORE_INDEX,
    ConfigError,
    atomic_torch_save,
    cache_folder,
    check_writable_folder,
)
from lightning_modules import MISTRAL_V1_TOKENIZER, InputRequirements, TextTokenizer, load_tokenizer

SPLITS = ("train", "val", "test")


class TensorRowsDataset(Dataset):
    """Rows of equally long tensors, served as dicts.

    Index ``len(dataset)`` is a padding row: the first row with every label masked (``IGNORE_INDEX``),
    which evens out shards across processes without scoring anything twice.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ConfigError(f"All tensors need the same number of rows, got {lengths}.")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index == len(self):
            row = {key: value[0] for key, value in self.tensors.items()}
            row["labels"] = torch.full_like(row["labels"], IGNORE_INDEX)
            return row
        return {key: value[index] for key, value in self.tensors.items()}


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


class TreasureIslandDataModule(L.LightningDataModule):
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
        super().__init__()
        val_chapters = [31, 32] if val_chapters is None else list(val_chapters)
        test_chapters = [33, 34] if test_chapters is None else list(test_chapters)
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be >= 1, got {eval_batch_size}.")
        if block_size < 2:
            raise ConfigError(f"data.block_size must be >= 2, got {block_size}.")
        stride = block_size // 2 if eval_stride is None else eval_stride
        if not 1 <= stride <= block_size:
            raise ConfigError(f"data.eval_stride must be between 1 and block_size ({block_size}), got {stride}.")
        if not val_chapters or not test_chapters:
            raise ConfigError("data.val_chapters and data.test_chapters must each name a chapter.")
        if set(val_chapters) & set(test_chapters):
            raise ConfigError(
                f"Chapters {sorted(set(val_chapters) & set(test_chapters))} are in both "
                "data.val_chapters and data.test_chapters; hold each out once."
            )
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}.")
        if model_requirements is not None and block_size > model_requirements.max_positions:
            raise ConfigError(
                f"data.block_size={block_size} exceeds the model's maximum positions "
                f"({model_requirements.max_positions}); lower data.block_size."
            )
        self.save_hyperparameters()
        self.book_path = book_path
        self.cache_dir = cache_folder(cache_dir)
        check_writable_folder(self.cache_dir, "data.cache_dir" if cache_dir else CACHE_FOLDER_SETTING)
        self.model_requirements = model_requirements
        self.download_url = download_url
        self.tokenizer_name = tokenizer
        self.block_size = block_size
        self.eval_stride = stride
        self.val_chapters = val_chapters
        self.test_chapters = test_chapters
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.prompts_file = prompts_file
        self.prompts = read_prompts_file(prompts_file) if prompts_file else list(prompts or DEFAULT_PROMPTS)
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ConfigError("data.prompts must hold at least one non-empty prompt.")
        self.chat_template = chat_template
        self.seed = seed
        self.datasets: dict[str, TensorRowsDataset] = {}
        self.splits: BookSplits | None = None
        self._tokenizer: TextTokenizer | None = None

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

    # ---- tokenization --------------------------------------------------------------------
    def resolve_tokenizer_source(self) -> str:
        """The tokenizer to use: explicit, else the model's own (``model_requirements``), else Mistral v1."""
        if self.tokenizer_name != "auto":
            return self.tokenizer_name
        if self.model_requirements is not None:
            return self.model_requirements.tokenizer
        return MISTRAL_V1_TOKENIZER

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            tokenizer = load_tokenizer(self.resolve_tokenizer_source())
            limit = self.model_requirements.vocab_size if self.model_requirements else None
            if limit is not None and tokenizer.vocab_size > limit:
                raise ConfigError(
                    f"The tokenizer has {tokenizer.vocab_size} tokens but the model only {limit}; "
                    "use the model's own tokenizer (data.tokenizer: auto)."
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    def check_ready(self) -> None:
        """Get the book (downloading it if needed), split it and load the tokenizer, so that a missing
        book, a chapter that does not exist or a tokenizer that cannot load is refused before a run starts."""
        self.prepare_data()
        self.load_splits()
        _ = self.tokenizer

    def check_batch_fits(self) -> None:
        """Refuse a training batch larger than the whole training split (a typo, not a batch: every step would
        be the whole book at once, in memory), before the run starts; the blocks are built and kept."""
        self.setup("fit")
        blocks = len(self.datasets["train"])
        if self.batch_size > blocks:
            raise ConfigError(
                f"data.batch_size {self.batch_size} is more than the {blocks} training blocks of the book "
                f"(data.block_size {self.block_size}); set at most {blocks}."
            )

    def load_splits(self) -> BookSplits:
        """Read, clean and split the book by chapter."""
        if self.splits is None:
            book = strip_gutenberg_boilerplate(read_utf8_text(self.book_file()))
            self.splits = assign_chapters(split_into_chapters(book), self.val_chapters, self.test_chapters)
        return self.splits

    def _cache_key(self, text_digest: str) -> str:
        spec = {
            "text": text_digest,
            "tokenizer": self.tokenizer.name,
            "block_size": self.block_size,
            "eval_stride": self.eval_stride,
            "val": self.val_chapters,
            "test": self.test_chapters,
            "format": 3,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def build_split_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tokenize each split and pack (train) or window (val/test) it; cached on disk."""
        splits = self.load_splits()
        texts = {name: splits.text(name) for name in SPLITS}
        digest = hashlib.sha256("\x1e".join(texts.values()).encode()).hexdigest()
        cache_file = self.cache_dir / "tokens" / f"{self._cache_key(digest)}.pt"
        if cache_file.is_file():
            return torch.load(cache_file, weights_only=True)
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
        atomic_torch_save(tensors, cache_file)
        return tensors

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return  # prompts need no book
        if self.datasets:
            return
        tensors = self.build_split_tensors()
        self.datasets = {name: TensorRowsDataset(tensors[name]) for name in SPLITS}
        counts = {name: int((t["labels"] != IGNORE_INDEX).sum()) for name, t in tensors.items()}
        rank_zero_info(
            f"Treasure Island: scored tokens train={counts['train']} val={counts['val']} "
            f"test={counts['test']} (tokenizer {self.tokenizer.name}, block {self.block_size})"
        )

    # ---- loaders -------------------------------------------------------------------------
    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        sampler = unrepeated_sampler(dataset)  # shared out without padding: no window is scored twice
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Training blocks in a fresh order each epoch (from ``seed``), sharded across processes, resumable."""
        dataset = self.datasets["train"]
        sampler = EpochShuffleSampler(len(dataset), seed=self.seed)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def prompt_items(self) -> list[dict]:
        """Each prompt with its token ids (BOS first), formatted for the model."""
        tok = self.tokenizer
        items = []
        for index, prompt in enumerate(self.prompts):
            text = instruction_text(prompt) if self.chat_template else prompt
            ids = torch.tensor([tok.bos_id, *tok.encode(text)], dtype=torch.long)
            items.append({"index": index, "prompt": prompt, "input_ids": ids})
        return items

    def predict_dataloader(self) -> DataLoader:
        """One prompt per batch: batch-1 decoding, timed per prompt. With several processes each takes its
        own share of the prompts (none twice); the prediction writer puts them back in order."""
        items = self.prompt_items()
        return DataLoader(
            items, batch_size=1, shuffle=False, sampler=unrepeated_sampler(items), collate_fn=_collate_prompt
        )


def _collate_prompt(items: list[dict]) -> dict:
    (item,) = items
    return {"index": item["index"], "prompt": item["prompt"], "input_ids": item["input_ids"][None]}  # (1, len)
