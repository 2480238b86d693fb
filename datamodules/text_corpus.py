"""A user's own text: a file, a folder or a glob of ``.txt`` / ``.md`` files, JSON Lines (``{"text": ...}``) or a
Hugging Face dataset on disk, split by document and scored exactly as the book is."""

from __future__ import annotations

import fnmatch
import hashlib
import random
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules.packing import (
    eval_segments,
    make_eval_windows,
    pack_into_blocks,
    pack_segments,
    positions_restarting_at,
    scored_bytes,
)
from datamodules.text_sources import (
    DATASET_FORMATS,
    JSONL_SUFFIXES,
    TEXT_SUFFIXES,
    field_value,
    find_data_files,
    read_records,
    read_text_file,
)
from datamodules.token_data import SPLITS, TokenDataModule
from foundation import IGNORE_INDEX, ConfigError
from lightning_modules import InputRequirements

CORPUS_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + tuple(DATASET_FORMATS)


@dataclass(frozen=True)
class Document:
    """One document's text and where it came from (a file, or a file's line or row)."""

    origin: str
    text: str


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ConfigError(f"data.{name} must be between 0 and 1 (exclusive), got {value}.")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction:g} leaves nothing to train on; "
            "hold out less than all of it."
        )


def held_out_counts(total: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of ``total`` items go to val and test (at least one each)."""
    return max(1, round(total * val_fraction)), max(1, round(total * test_fraction))


def split_by_name(
    documents: list[Document], val_files: list[str], test_files: list[str]
) -> tuple[list[Document], dict[str, list[Document]]]:
    """Documents whose origin matches a pattern of ``val_files`` / ``test_files`` (a file name or glob)."""
    named: dict[str, list[Document]] = {"val": [], "test": []}
    rest = []
    for document in documents:
        file = document.origin.split(":")[0].split(" row ")[0]
        for split, patterns in (("val", val_files), ("test", test_files)):
            if any(fnmatch.fnmatch(file, p) or fnmatch.fnmatch(file.rsplit("/", 1)[-1], p) for p in patterns):
                named[split].append(document)
                break
        else:
            rest.append(document)
    for split, patterns in (("val", val_files), ("test", test_files)):
        if patterns and not named[split]:
            raise ConfigError(f"data.{split}_files {patterns} match no file of the corpus; name files it holds.")
    return rest, named


def cut_at_whitespace(text: str, at: int) -> int:
    """The first paragraph break, else line break, else space, at or after ``at`` (``len(text)`` if none)."""
    for mark in ("\n\n", "\n", " "):
        found = text.find(mark, at)
        if found != -1 and found - at < max(2000, len(text) // 10):
            return found
    return len(text)


def split_inside(documents: list[Document], val_fraction: float, test_fraction: float) -> dict[str, list[Document]]:
    """Each document's start for train, then a part for val and the end for test, cut at whitespace."""
    parts: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for document in documents:
        text = document.text
        first = cut_at_whitespace(text, int(len(text) * (1 - val_fraction - test_fraction)))
        second = cut_at_whitespace(text, max(first + 1, int(len(text) * (1 - test_fraction))))
        pieces = {"train": text[:first], "val": text[first:second], "test": text[second:]}
        if not all(piece.strip() for piece in pieces.values()):
            parts["train"].append(document)  # too short to cut in three
            continue
        for name, piece in pieces.items():
            parts[name].append(Document(f"{document.origin} ({name} part)", piece.strip()))
    return parts


class TextCorpusDataModule(TokenDataModule):
    """Your own text, for fine-tuning or for ``smarter compare``: one document per ``.txt`` / ``.md`` file, per
    JSON Lines row (``{"text": ...}``) or per row of a Hugging Face dataset on disk.

    Documents are split into train / val / test by a seeded shuffle (or by name). A corpus of too few
    documents for that is split inside each document instead (its start trains, its end is held out), and
    the run says so. Each document is ``BOS text EOS``; training packs them into blocks, evaluation scores
    every token once with sliding windows, and bits per byte counts the documents' own UTF-8 bytes.

    Args:
        path: A file, a folder (searched recursively) or a glob of ``.txt``, ``.md``, ``.jsonl``, ``.parquet``,
            ``.arrow``, ``.csv`` or ``.json`` files, or a folder written by ``datasets``' ``save_to_disk``.
        columns: Our field names mapped to yours, e.g. ``{"text": "body"}`` (JSON Lines and datasets).
        dataset_split: Which split of a saved ``DatasetDict`` to read; unset means ``train`` (or the first).
        val_fraction: Share of documents held out for validation.
        test_fraction: Share of documents held out for test.
        val_files: File names or globs held out for validation (instead of ``val_fraction``).
        test_files: File names or globs held out for test (instead of ``test_fraction``).
        split_seed: Seed of the shuffle that assigns documents to splits.
        attend_within_documents: Restart positions at every document, so that a token attends only to its own
            document (packed rows then score each document as if it were alone; SDPA gets a block-diagonal
            mask). Off: a block's tokens attend across document boundaries, as in plain packing.
        prompts: Prompts for ``predict``; unset uses the openings of the first held-out (val) documents.
        chat_template: Wrap prompts in Mistral's instruction format (off: the model continues the text).
        Other arguments: as in ``TokenDataModule``.
    """

    title = "corpus"
    source_name = "the corpus"

    def __init__(
        self,
        path: str = "",
        columns: dict[str, str] | None = None,
        dataset_split: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        val_files: list[str] | None = None,
        test_files: list[str] | None = None,
        split_seed: int = 0,
        attend_within_documents: bool = False,
        cache_dir: str | None = None,
        tokenizer: str = "auto",
        block_size: int = 256,
        eval_stride: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        chat_template: bool = False,
        seed: int = 0,
        model_requirements: InputRequirements | None = None,
    ) -> None:
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
        check_fractions(val_fraction, test_fraction)
        self.save_hyperparameters(ignore=["model_requirements"])
        self.path = path
        self.columns = dict(columns or {})
        self.dataset_split = dataset_split
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.val_files = list(val_files or [])
        self.test_files = list(test_files or [])
        self.split_seed = split_seed
        self.attend_within_documents = attend_within_documents
        self.splits: dict[str, list[Document]] | None = None
        self.split_note = ""

    # ---- reading and splitting -------------------------------------------------------------------
    def read_documents(self) -> list[Document]:
        documents = []
        files = find_data_files(self.path, "data.path", CORPUS_SUFFIXES)
        texts = [f for f in files if f.suffix in TEXT_SUFFIXES]
        for file in texts:
            documents.append(Document(str(file), read_text_file(file)))
        rows = [f for f in files if f.suffix not in TEXT_SUFFIXES]
        for record in read_records(rows, self.dataset_split):
            text = field_value(record, "text", self.columns)
            if not text.strip():
                raise ConfigError(f"{record.origin}: the text is empty; remove the row or give it text.")
            documents.append(Document(record.origin, text))
        return documents

    def load_source(self) -> dict[str, list[Document]]:
        """Read the corpus and assign its documents to train / val / test."""
        if self.splits is not None:
            return self.splits
        documents = self.read_documents()
        rest, named = split_by_name(documents, self.val_files, self.test_files)
        order = list(range(len(rest)))
        random.Random(self.split_seed).shuffle(order)
        rest = [rest[i] for i in order]
        n_val, n_test = held_out_counts(len(rest), self.val_fraction, self.test_fraction)
        n_val, n_test = (0 if named["val"] else n_val), (0 if named["test"] else n_test)
        if len(rest) - n_val - n_test >= 1:
            splits = {
                "val": named["val"] or rest[:n_val],
                "test": named["test"] or rest[n_val : n_val + n_test],
                "train": rest[n_val + n_test :],
            }
            self.split_note = (
                f"{len(documents)} documents: train {len(splits['train'])}, val {len(splits['val'])}, "
                f"test {len(splits['test'])}"
            )
        elif named["val"] or named["test"]:
            raise ConfigError(
                f"data.val_files / data.test_files leave {len(rest)} document(s) for the other splits; "
                "name fewer held-out files or add documents."
            )
        else:
            splits = split_inside(documents, self.val_fraction, self.test_fraction)
            self.split_note = (
                f"{len(documents)} document(s), too few to split by document: each one's start trains and its "
                f"end is held out (val {self.val_fraction:g}, test {self.test_fraction:g} of its characters)"
            )
        for name in SPLITS:
            if not splits[name]:
                raise ConfigError(
                    f"the corpus's {name} split is empty ({self.split_note}); add text or documents, or change "
                    "data.val_fraction / data.test_fraction."
                )
        self.splits = splits
        return splits

    def default_prompts(self) -> list[str]:
        """The opening (up to about 200 characters) of each of the first four validation documents."""
        openings = []
        for document in self.load_source()["val"][:4]:
            text = document.text.strip()
            openings.append(text[:200].rsplit(" ", 1)[0].strip() if len(text) > 200 else text)
        return openings

    def cache_spec(self) -> dict:
        splits = self.load_source()
        digest = hashlib.sha256()
        for name in SPLITS:
            for document in splits[name]:
                digest.update(f"{name}\x1f{document.origin}\x1f{document.text}\x1e".encode())
        return {"text": digest.hexdigest(), "within": self.attend_within_documents, "format": 1}

    # ---- rows ------------------------------------------------------------------------------------
    def document_ids(self, document: Document) -> list[int]:
        tok = self.tokenizer
        return [tok.bos_id, *tok.encode(document.text), tok.eos_id]

    def build_split_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        splits = self.load_source()
        tok = self.tokenizer
        byte_lengths = torch.tensor(tok.token_byte_lengths(), dtype=torch.long)
        pad_id = tok.eos_id
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        stream = torch.tensor([i for d in splits["train"] for i in self.document_ids(d)], dtype=torch.long)
        train = pack_into_blocks(stream, self.block_size, pad_id)
        train["labels"][train["labels"] == tok.bos_id] = IGNORE_INDEX  # a new document's BOS is given, not guessed
        if self.attend_within_documents:
            train["position_ids"] = positions_restarting_at(train["input_ids"], tok.bos_id)
        tensors["train"] = train
        for name in ("val", "test"):
            text_bytes = sum(len(d.text.encode("utf-8")) for d in splits[name])
            if self.attend_within_documents:
                segments = []
                for document in splits[name]:
                    ids = torch.tensor(self.document_ids(document)[1:], dtype=torch.long)
                    segments += eval_segments(ids, tok.bos_id, self.block_size, self.eval_stride)
                rows = pack_segments(segments, self.block_size, pad_id)
            else:
                ids = torch.tensor([i for d in splits[name] for i in self.document_ids(d)][1:], dtype=torch.long)
                rows = make_eval_windows(ids, tok.bos_id, self.block_size, self.eval_stride, pad_id)
                rows["labels"][rows["labels"] == tok.bos_id] = IGNORE_INDEX
            rows["scored_bytes"] = scored_bytes(rows["labels"], byte_lengths, text_bytes)
            tensors[name] = rows
        return tensors

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict" and not self.datasets:
            self.load_source()
            rank_zero_info(f"corpus {self.path}: {self.split_note}")
        super().setup(stage)
