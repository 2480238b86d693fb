"""What every data module of this framework shares: the tokenizer, the block, the loaders, the prompts.

A subclass says where its text comes from and how it becomes rows (``build_split_tensors``); this base
caches those rows on disk, checks them before a run, shards and resumes the training order, scores every
evaluation token once across processes, and serves the prompts that ``predict`` decodes.

Rows are dicts of equally long tensors: ``input_ids`` and already-shifted ``labels`` (``IGNORE_INDEX``
where nothing is scored), optionally ``position_ids`` (restarting at 0 where a document starts, so that
attention stays inside each document) and, for evaluation splits, ``scored_bytes`` (bits per byte).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

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


class TokenDataModule(L.LightningDataModule):
    """The base of the framework's data modules (see the module docstring for the row format).

    Args:
        cache_dir: Folder for downloads and token caches. Unset: ``$SMARTER_CACHE_DIR`` or
            ``~/.cache/scaling-smarter``.
        tokenizer: ``"auto"`` (the model's own tokenizer, or Mistral v1 for presets),
            ``"mistral-v1"``, or a hub id / folder / SentencePiece ``.model`` file.
        block_size: Tokens per training block and per evaluation window.
        eval_stride: Step between evaluation windows; unset means ``block_size // 2``.
        batch_size: Training rows per batch.
        eval_batch_size: Evaluation rows per batch; unset means ``batch_size``.
        num_workers: DataLoader worker processes.
        prompts: Prompts for ``predict``; unset uses the module's own.
        prompts_file: File of prompts for ``predict`` (one per line, or JSON Lines with ``prompt``);
            takes precedence over ``prompts``.
        chat_template: Wrap prompts in Mistral's ``[INST] ... [/INST]`` instruction format.
        seed: Seed of the training order (each epoch is a fresh shuffle of it).
        model_requirements: What the model needs of the text (its tokenizer, maximum positions and
            vocabulary). The ``smarter`` command links it from the model; unset means the Mistral v1
            tokenizer and no length check.
    """

    #: Shown in the line that reports the scored tokens.
    title = "data"
    #: What the training rows are cut from, in messages.
    source_name = "the data"

    def __init__(
        self,
        cache_dir: str | None = None,
        tokenizer: str = "auto",
        block_size: int = 256,
        eval_stride: int | None = None,
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
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}.")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be >= 1, got {eval_batch_size}.")
        if block_size < 2:
            raise ConfigError(f"data.block_size must be >= 2, got {block_size}.")
        stride = block_size // 2 if eval_stride is None else eval_stride
        if not 1 <= stride <= block_size:
            raise ConfigError(f"data.eval_stride must be between 1 and block_size ({block_size}), got {stride}.")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}.")
        if model_requirements is not None and block_size > model_requirements.max_positions:
            raise ConfigError(
                f"data.block_size={block_size} exceeds the model's maximum positions "
                f"({model_requirements.max_positions}); lower data.block_size."
            )
        self.cache_dir = cache_folder(cache_dir)
        check_writable_folder(self.cache_dir, "data.cache_dir" if cache_dir else CACHE_FOLDER_SETTING)
        self.model_requirements = model_requirements
        self.tokenizer_name = tokenizer
        self.block_size = block_size
        self.eval_stride = stride
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.prompts_file = prompts_file
        self.given_prompts = read_prompts_file(prompts_file) if prompts_file else prompts
        if self.given_prompts is not None and (
            not self.given_prompts or not all(p.strip() for p in self.given_prompts)
        ):
            raise ConfigError("data.prompts must hold at least one non-empty prompt.")
        self.chat_template = chat_template
        self.seed = seed
        self.datasets: dict[str, Dataset] = {}
        self._tokenizer: TextTokenizer | None = None

    # ---- what a subclass provides ----------------------------------------------------------------
    def load_source(self) -> Any:
        """Read (and split) the text, raising ``ConfigError`` for anything wrong with it. Called before a run."""
        raise NotImplementedError

    def cache_spec(self) -> dict[str, Any]:
        """Everything besides the tokenizer and the block that decides the rows (the text's digest included)."""
        raise NotImplementedError

    def build_split_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Rows of every split in ``SPLITS``, built from the text (uncached)."""
        raise NotImplementedError

    def default_prompts(self) -> list[str]:
        """Prompts for ``predict`` when none are configured."""
        return list(DEFAULT_PROMPTS)

    def train_collate(self):
        """The training loader's collate function (None: stack equally long rows)."""
        return None

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

    # ---- checks before a run ---------------------------------------------------------------------
    def check_ready(self) -> None:
        """Get and read the text and load the tokenizer, so that missing or malformed data, or a tokenizer
        that cannot load, is refused before a run starts."""
        self.prepare_data()
        self.load_source()
        _ = self.tokenizer

    def check_batch_fits(self) -> None:
        """Refuse a training batch larger than the whole training split (a typo, not a batch: every step would
        be the whole split at once, in memory), before the run starts; the rows are built and kept."""
        self.setup("fit")
        rows = len(self.datasets["train"])
        if self.batch_size > rows:
            raise ConfigError(
                f"data.batch_size {self.batch_size} is more than the {rows} training blocks of "
                f"{self.source_name} (data.block_size {self.block_size}); set at most {rows}."
            )

    # ---- rows ------------------------------------------------------------------------------------
    def cached_split_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """``build_split_tensors``, cached on disk by everything that decides the rows."""
        self.load_source()
        spec = {
            **self.cache_spec(),
            "class": type(self).__name__,
            "tokenizer": self.tokenizer.name,
            "block_size": self.block_size,
            "eval_stride": self.eval_stride,
        }
        key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]
        cache_file = self.cache_dir / "tokens" / f"{key}.pt"
        if cache_file.is_file():
            return torch.load(cache_file, weights_only=True)
        tensors = self.build_split_tensors()
        atomic_torch_save(tensors, cache_file)
        return tensors

    def make_dataset(self, split: str, tensors: dict[str, Any]) -> Dataset:
        return TensorRowsDataset(tensors)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return  # prompts need no rows
        if self.datasets:
            return
        tensors = self.cached_split_tensors()
        self.datasets = {name: self.make_dataset(name, tensors[name]) for name in SPLITS}
        counts = {name: scored_tokens(t["labels"]) for name, t in tensors.items()}
        rank_zero_info(
            f"{self.title}: scored tokens train={counts['train']} val={counts['val']} "
            f"test={counts['test']} (tokenizer {self.tokenizer.name}, block {self.block_size})"
        )

    # ---- loaders -------------------------------------------------------------------------
    @property
    def fixed_batch_shape(self) -> bool:
        """Whether the model needs every training batch of one shape (compiled layers)."""
        return bool(self.model_requirements and self.model_requirements.fixed_batch_shape)

    @property
    def train_batch_multiple(self) -> int:
        """Training shares are padded to a multiple of this many rows: the batch size where the model needs
        fixed shapes (the last batch then full, its extra rows masked), else 1."""
        return self.batch_size if self.fixed_batch_shape else 1

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
        """Training rows in a fresh order each epoch (from ``seed``), sharded across processes, resumable."""
        dataset = self.datasets["train"]
        sampler = EpochShuffleSampler(len(dataset), seed=self.seed, batch_size=self.train_batch_multiple)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.train_collate(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # ---- prompts ---------------------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        return list(self.given_prompts) if self.given_prompts is not None else self.default_prompts()

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
            items, batch_size=1, shuffle=False, sampler=unrepeated_sampler(items), collate_fn=collate_prompt
        )


def scored_tokens(labels: torch.Tensor | list[torch.Tensor]) -> int:
    """How many targets rows score."""
    if isinstance(labels, list):
        return sum(int((row != IGNORE_INDEX).sum()) for row in labels)
    return int((labels != IGNORE_INDEX).sum())


def collate_prompt(items: list[dict]) -> dict:
    (item,) = items
    batch = {key: value for key, value in item.items() if key != "input_ids"}
    batch["input_ids"] = item["input_ids"][None]  # (1, len)
    return batch
