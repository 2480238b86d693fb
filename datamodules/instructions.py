"""Instruction and chat data: JSON Lines (or a dataset on disk) of ``{"prompt", "response"}`` or ``{"messages": [...]}``
rendered with the model's chat template, trained and scored on the assistant's tokens only."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from datamodules.packing import pack_segments, scored_bytes
from datamodules.text_corpus import check_fractions, held_out_counts
from datamodules.text_sources import DATASET_FORMATS, JSONL_SUFFIXES, Record, field_value, find_data_files, read_records
from datamodules.token_data import SPLITS, TokenDataModule, scored_tokens
from foundation import IGNORE_INDEX, ConfigError
from lightning_modules import InputRequirements

INSTRUCTION_SUFFIXES = JSONL_SUFFIXES + tuple(DATASET_FORMATS)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One sample: an optional system message, then user / assistant turns, the assistant's last."""

    origin: str
    messages: tuple[tuple[str, str], ...]  # (role, content)

    @property
    def prompt(self) -> str:
        """The last user message."""
        return next(content for role, content in reversed(self.messages) if role == "user")

    @property
    def response(self) -> str:
        return self.messages[-1][1]


def conversation_from(record: Record, columns: dict[str, str]) -> Conversation:
    """A record as a conversation, checked: roles in order, every content text, the last turn the assistant's."""
    has = set(record.fields)
    if columns.get("messages", "messages") in has:
        raw = field_value(record, "messages", columns, list)
        messages = []
        for index, message in enumerate(raw):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ConfigError(
                    f"{record.origin}: message {index} is not an object with 'role' and 'content'; fix the row."
                )
            if not isinstance(message["content"], str):
                raise ConfigError(f"{record.origin}: message {index}'s content is not text; fix the row.")
            messages.append((str(message["role"]), message["content"]))
    elif columns.get("prompt", "prompt") in has or columns.get("response", "response") in has:
        messages = []
        if columns.get("system", "system") in has and record.fields[columns.get("system", "system")]:
            messages.append(("system", field_value(record, "system", columns)))
        messages += [
            ("user", field_value(record, "prompt", columns)),
            ("assistant", field_value(record, "response", columns)),
        ]
    else:
        present = ", ".join(repr(key) for key in list(record.fields)[:6])
        raise ConfigError(
            f"{record.origin} has neither 'messages' nor 'prompt' and 'response' (it has {present}); "
            "fix the row, or map your columns with data.columns."
        )
    check_roles(record.origin, messages)
    return Conversation(record.origin, tuple(messages))


def check_roles(origin: str, messages: list[tuple[str, str]]) -> None:
    """An optional system message first, then user and assistant turns in turn, ending with the assistant."""
    if not messages:
        raise ConfigError(f"{origin}: the conversation has no message; remove the row or give it turns.")
    turns = messages[1:] if messages[0][0] == "system" else messages
    for index, (role, _) in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            at = index + (len(messages) - len(turns))
            what = "a role it does not know" if role not in ROLES else "out of order"
            raise ConfigError(
                f"{origin}: message {at} has role {role!r} ({what}) where {expected!r} was expected; "
                "a conversation is an optional system message, then user and assistant turns in turn."
            )
    if not turns or turns[-1][0] != "assistant":
        raise ConfigError(f"{origin}: the conversation ends without an assistant message; end it with the answer.")


@dataclass(frozen=True)
class RenderedSample:
    """A conversation as token ids (BOS first) and, per id, whether it is the assistant's (scored)."""

    origin: str
    ids: list[int]
    assistant: list[bool]
    prompt_ids: list[int]  # everything before the last assistant message (what ``predict`` is given)


class RaggedRowsDataset(Dataset):
    """Rows of different lengths (one sample each), padded per batch by ``pad_batch``. Index ``len(dataset)``
    is a padding row: the first row with every label masked."""

    def __init__(self, rows: dict[str, list[torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index == len(self):
            return {
                "input_ids": self.rows["input_ids"][0],
                "labels": torch.full_like(self.rows["labels"][0], IGNORE_INDEX),
            }
        return {"input_ids": self.rows["input_ids"][index], "labels": self.rows["labels"][index]}


class BatchPadder:
    """Pads a batch of ragged rows to its longest row, or to ``pad_to`` (``pad_id`` inputs, masked labels, on the
    right)."""

    def __init__(self, pad_id: int, pad_to: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to = pad_to

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = self.pad_to or max(item["input_ids"].numel() for item in items)
        inputs = torch.full((len(items), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            n = item["input_ids"].numel()
            inputs[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
        return {"input_ids": inputs, "labels": labels}


def count_summary(counts: dict[str, int]) -> str:
    """``"21 kept (1 truncated), 1 dropped (no answer within the block)"``: what became of a split's samples."""
    parts = [
        f"{counts.get('kept', 0)} kept" + (f" ({counts['truncated']} truncated)" if counts.get("truncated") else "")
    ]
    parts += [f"{value} {what}" for what, value in sorted(counts.items()) if what.startswith("dropped")]
    return ", ".join(parts)


class InstructionDataModule(TokenDataModule):
    """Instruction or chat data, trained and scored on the assistant's answers.

    Each JSON Lines row (or dataset row) is ``{"prompt": ..., "response": ...}`` (optionally ``"system"``) or
    ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``. Conversations are rendered
    with Mistral's instruction format, ``<s>[INST] user [/INST] answer</s>[INST] ...`` (the format of
    Mistral-7B-Instruct v0.1/v0.2, a system message put in front of the first user message), or with the
    tokenizer's own chat template (``template: tokenizer``). Loss and perplexity count the assistant's tokens
    and its closing EOS only, unless ``train_on: everything``.

    Training rows pack whole samples (none split across rows) or, with ``packing: false``, hold one sample
    each, padded per batch. Evaluation rows pack whole samples with positions restarting at each, so every
    held-out sample is scored as if alone. A sample longer than ``block_size`` is truncated, dropped or
    refused (``overlong``); the counts of kept, truncated and dropped samples are printed and logged.

    Args:
        path: A ``.jsonl`` file, a folder or glob of them, parquet / arrow / csv / json files, or a folder
            written by ``datasets``' ``save_to_disk``.
        columns: Our field names mapped to yours, e.g. ``{"prompt": "question", "response": "answer"}``.
        dataset_split: Which split of a saved ``DatasetDict`` to read; unset means ``train`` (or the first).
        val_path: Held-out samples for validation (instead of ``val_fraction``).
        test_path: Held-out samples for test (instead of ``test_fraction``).
        val_fraction: Share of samples held out for validation.
        test_fraction: Share of samples held out for test.
        split_seed: Seed of the shuffle that assigns samples to splits.
        template: ``mistral`` (the ``[INST]`` format) or ``tokenizer`` (the chat template of a Hugging Face
            tokenizer; the assistant's tokens are found by rendering each conversation's prefixes).
        train_on: ``responses`` (the assistant's tokens only) or ``everything``.
        packing: Pack whole samples into ``block_size`` rows (True) or pad each batch to its longest sample.
        attend_within_samples: In packed training rows, restart positions at every sample so that each attends
            only to itself (SDPA gets a block-diagonal mask). Off: a sample also sees the samples packed before it.
        overlong: A sample longer than ``block_size`` is ``truncate``d (its end cut), ``drop``ped, or an
            ``error``.
        predict_samples: How many held-out (val) prompts ``predict`` answers when no prompts are configured.
        Other arguments: as in ``TokenDataModule``.
    """

    title = "instructions"
    source_name = "the instruction set"

    def __init__(
        self,
        path: str = "",
        columns: dict[str, str] | None = None,
        dataset_split: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        template: Literal["mistral", "tokenizer"] = "mistral",
        train_on: Literal["responses", "everything"] = "responses",
        packing: bool = True,
        attend_within_samples: bool = False,
        overlong: Literal["truncate", "drop", "error"] = "truncate",
        predict_samples: int = 8,
        cache_dir: str | None = None,
        tokenizer: str = "auto",
        block_size: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        chat_template: bool = True,
        seed: int = 0,
        model_requirements: InputRequirements | None = None,
    ) -> None:
        super().__init__(
            cache_dir=cache_dir,
            tokenizer=tokenizer,
            block_size=block_size,
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
        for name, value, choices in (
            ("template", template, ("mistral", "tokenizer")),
            ("train_on", train_on, ("responses", "everything")),
            ("overlong", overlong, ("truncate", "drop", "error")),
        ):
            if value not in choices:
                raise ConfigError(f"data.{name} must be one of {', '.join(choices)}; got {value!r}.")
        if predict_samples < 1:
            raise ConfigError(f"data.predict_samples must be >= 1, got {predict_samples}.")
        self.save_hyperparameters(ignore=["model_requirements"])
        self.path = path
        self.columns = dict(columns or {})
        self.dataset_split = dataset_split
        self.val_path = val_path
        self.test_path = test_path
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.template = template
        self.train_on = train_on
        self.packing = packing
        self.attend_within_samples = attend_within_samples
        self.overlong = overlong
        self.predict_samples = predict_samples
        self.splits: dict[str, list[Conversation]] | None = None
        self.rendered: dict[Conversation, RenderedSample] = {}  # every sample, rendered once by load_source
        self.counts: dict[str, Counter] = {}

    # ---- reading and splitting -------------------------------------------------------------------
    def read_conversations(self, path: str, option: str) -> list[Conversation]:
        files = find_data_files(path, option, INSTRUCTION_SUFFIXES)
        return [conversation_from(record, self.columns) for record in read_records(files, self.dataset_split)]

    def load_source(self) -> dict[str, list[Conversation]]:
        """Read and check every sample, and assign them to train / val / test."""
        if self.splits is not None:
            return self.splits
        samples = self.read_conversations(self.path, "data.path")
        given = {
            name: self.read_conversations(path, f"data.{name}_path")
            for name, path in (("val", self.val_path), ("test", self.test_path))
            if path
        }
        for sample in [*samples, *(s for held_out in given.values() for s in held_out)]:
            # an answer empty after templating is refused here, before the run, by file and line
            self.rendered[sample] = self.render(sample)
        order = list(range(len(samples)))
        random.Random(self.split_seed).shuffle(order)
        samples = [samples[i] for i in order]
        n_val, n_test = held_out_counts(len(samples), self.val_fraction, self.test_fraction)
        splits: dict[str, list[Conversation]] = {}
        for name, count in (("val", n_val), ("test", n_test)):
            if name in given:
                splits[name] = given[name]
            else:
                splits[name], samples = samples[:count], samples[count:]
        splits["train"] = samples
        if not splits["train"]:
            raise ConfigError(
                f"the instruction set's train split is empty ({len(order)} samples in {self.path}); add samples "
                "or hold out fewer (data.val_fraction, data.test_fraction)."
            )
        self.splits = splits
        return splits

    # ---- rendering -------------------------------------------------------------------------------
    def render(self, sample: Conversation) -> RenderedSample:
        rendered = self._render_tokenizer(sample) if self.template == "tokenizer" else self._render_mistral(sample)
        last_answer = len(rendered.ids) - len(rendered.prompt_ids)
        if last_answer <= 1 or not any(rendered.assistant):  # the closing EOS alone is no answer
            raise ConfigError(
                f"{sample.origin}: the response is empty once templated (no token of its own); "
                "remove the row or give it an answer."
            )
        return rendered

    def _render_mistral(self, sample: Conversation) -> RenderedSample:
        tok = self.tokenizer
        messages = list(sample.messages)
        system = messages.pop(0)[1].strip() if messages[0][0] == "system" else ""
        ids, assistant = [tok.bos_id], [False]
        prompt_ids: list[int] = []
        for turn in range(0, len(messages), 2):
            user = messages[turn][1].strip()
            if turn == 0 and system:
                user = f"{system}\n\n{user}"
            asked = tok.encode(f"[INST] {user} [/INST]")
            ids += asked
            assistant += [False] * len(asked)
            prompt_ids = list(ids)
            answer = [*tok.encode(messages[turn + 1][1].strip()), tok.eos_id]
            ids += answer
            assistant += [True] * len(answer)
        return RenderedSample(sample.origin, ids, assistant, prompt_ids)

    def _render_tokenizer(self, sample: Conversation) -> RenderedSample:
        tok = self.tokenizer
        hf = getattr(tok, "_tok", None)
        if hf is None or not getattr(hf, "chat_template", None):
            raise ConfigError(
                f"data.template: tokenizer needs a Hugging Face tokenizer with a chat template, and "
                f"{tok.name} has none; use data.template: mistral."
            )
        messages = [{"role": role, "content": content} for role, content in sample.messages]

        def ids_of(part: list[dict], prompt: bool) -> list[int]:
            text = hf.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt)
            return list(hf(text, add_special_tokens=False)["input_ids"])

        full = ids_of(messages, False)
        assistant = [False] * len(full)
        prompt_ids: list[int] = []
        for index, (role, _) in enumerate(sample.messages):
            if role != "assistant":
                continue
            before, upto = ids_of(messages[:index], True), ids_of(messages[: index + 1], False)
            if full[: len(before)] != before or full[: len(upto)] != upto:
                raise ConfigError(
                    f"{sample.origin}: the tokenizer's chat template renders a conversation differently from its "
                    "prefixes, so the answer's tokens cannot be found; use data.template: mistral."
                )
            assistant[len(before) : len(upto)] = [True] * (len(upto) - len(before))
            prompt_ids = before
        return RenderedSample(sample.origin, full, assistant, prompt_ids)

    # ---- rows ------------------------------------------------------------------------------------
    def sample_segment(self, rendered: RenderedSample, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(inputs, labels)`` of one sample, fitted to the block by ``overlong``; None when dropped."""
        ids = torch.tensor(rendered.ids, dtype=torch.long)
        scored = torch.tensor(rendered.assistant[1:], dtype=torch.bool)
        if self.train_on == "everything" and split == "train":
            scored = torch.ones_like(scored)
        inputs, labels = ids[:-1], torch.where(scored, ids[1:], IGNORE_INDEX)
        counts = self.counts.setdefault(split, Counter())
        if inputs.numel() > self.block_size:
            if self.overlong == "error":
                raise ConfigError(
                    f"{rendered.origin} renders to {inputs.numel() + 1} tokens, more than data.block_size "
                    f"{self.block_size} can train on; raise data.block_size, or set data.overlong to truncate or drop."
                )
            if self.overlong == "drop":
                counts["dropped"] += 1
                return None
            inputs, labels = inputs[: self.block_size], labels[: self.block_size]
            if not (labels != IGNORE_INDEX).any():
                counts["dropped (no answer within the block)"] += 1
                return None
            counts["truncated"] += 1
        counts["kept"] += 1
        return inputs, labels

    def cache_spec(self) -> dict:
        splits = self.load_source()
        digest = hashlib.sha256()
        for name in SPLITS:
            for sample in splits[name]:
                digest.update(json.dumps([name, sample.origin, sample.messages]).encode())
        settings = (self.template, self.train_on, self.packing, self.attend_within_samples, self.overlong)
        return {"samples": digest.hexdigest(), "settings": settings, "format": 1}

    def build_split_tensors(self) -> dict[str, dict]:
        splits = self.load_source()
        tok = self.tokenizer
        byte_lengths = torch.tensor(tok.token_byte_lengths(), dtype=torch.long)
        self.counts = {}
        tensors: dict[str, dict] = {}
        for name in SPLITS:
            segments = [self.sample_segment(self.rendered[sample], name) for sample in splits[name]]
            segments = [segment for segment in segments if segment is not None]
            if not segments:
                raise ConfigError(
                    f"every sample of the {name} split of {self.path} is longer than data.block_size {self.block_size} "
                    f"({dict(self.counts[name])}); raise data.block_size."
                )
            if name == "train" and not self.packing:
                tensors[name] = {"input_ids": [s[0] for s in segments], "labels": [s[1] for s in segments]}
                continue
            rows = pack_segments(segments, self.block_size, tok.eos_id)
            if name == "train" and not self.attend_within_samples:
                del rows["position_ids"]  # each sample also sees those packed before it, as plain packing does
            if name != "train":
                rows["scored_bytes"] = scored_bytes(rows["labels"], byte_lengths)
            tensors[name] = rows
        tensors["counts"] = {name: dict(counter) for name, counter in self.counts.items()}
        return tensors

    def make_dataset(self, split: str, tensors: dict) -> Dataset:
        if isinstance(tensors["input_ids"], list):
            return RaggedRowsDataset(tensors)
        return super().make_dataset(split, tensors)

    def train_collate(self):
        if self.packing:
            return None
        return BatchPadder(self.tokenizer.eos_id, self.block_size if self.fixed_batch_shape else None)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" or self.datasets:
            return
        tensors = self.cached_split_tensors()
        counts = tensors.pop("counts")
        self.datasets = {name: self.make_dataset(name, tensors[name]) for name in SPLITS}
        scored = {name: scored_tokens(tensors[name]["labels"]) for name in SPLITS}
        summary = "; ".join(f"{name}: {count_summary(counts.get(name, {}))}" for name in SPLITS)
        rank_zero_info(
            f"instructions {self.path}: samples {summary} (block {self.block_size}, overlong: {self.overlong}); "
            f"scored tokens train={scored['train']} val={scored['val']} test={scored['test']} "
            f"(tokenizer {self.tokenizer.name}, {'responses only' if self.train_on == 'responses' else 'everything'})"
        )
        self.sample_counts = counts

    def log_sample_counts(self) -> None:
        """Put the kept / truncated / dropped counts in the run's log (once, when a trainer with a logger runs)."""
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is None or getattr(self, "_counts_logged", False) or not getattr(self, "sample_counts", None):
            return
        self._counts_logged = True
        metrics = {}
        for name, counter in self.sample_counts.items():
            for kind in ("kept", "truncated", "dropped"):
                metrics[f"data/{name}_samples_{kind}"] = float(
                    sum(value for what, value in counter.items() if what.split(" ")[0] == kind)
                )
        logger.log_metrics(metrics, step=0)

    def train_dataloader(self):
        self.log_sample_counts()
        return super().train_dataloader()

    def val_dataloader(self):
        self.log_sample_counts()
        return super().val_dataloader()

    def test_dataloader(self):
        self.log_sample_counts()
        return super().test_dataloader()

    # ---- predict ---------------------------------------------------------------------------------
    def prompt_items(self) -> list[dict]:
        """The configured prompts, or the first ``predict_samples`` held-out (val) prompts with their reference
        answers, rendered as for training up to where the answer starts."""
        if self.given_prompts is not None:
            return super().prompt_items()
        items = []
        for index, sample in enumerate(self.load_source()["val"][: self.predict_samples]):
            rendered = self.rendered[sample]
            items.append(
                {
                    "index": index,
                    "prompt": sample.prompt,
                    "reference": sample.response,
                    "input_ids": torch.tensor(rendered.prompt_ids, dtype=torch.long),
                }
            )
        return items
