"""What a study runs and how it measures: one object, handed whole to every variant's process."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundation import ConfigError, atomic_write_json, check_writable_folder

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_VARIANTS = [f"variants/{q}-{a}.yaml" for q in ("bf16", "int8", "nf4") for a in ("eager", "sdpa")]


def is_config_file(data: str) -> bool:
    return Path(data).suffix in (".yaml", ".yml")


def check_data_option(data: str) -> None:
    """Refuse a ``--data`` that names nothing, before any variant runs."""
    if is_config_file(data):
        if not Path(data).is_file():
            raise ConfigError(f"compare --data {data}: no such config file; give a data config (configs/data/*.yaml).")
        return
    from datamodules.text_corpus import CORPUS_SUFFIXES
    from datamodules.text_sources import find_data_files

    find_data_files(data, "compare --data", CORPUS_SUFFIXES)


@dataclass
class StudySettings:
    """What the study runs and how it measures.

    Args:
        variants: Variant configs (paths; bare names are looked up in ``configs/variants/``).
        output_dir: Report folder; unset means ``study/<date-time>``.
        overrides: Extra CLI arguments for every variant, e.g. ``"--model.source tiny"``.
        data: What the variants are scored on, instead of the book: a data config (``configs/data/*.yaml``,
            its ``data.path`` set inside it or in ``overrides``), or a text file, folder or glob of your own
            (read by ``datamodules.TextCorpusDataModule``, its held-out split scored).
        reference: The variant the others are compared with (KL, top-1 agreement, perplexity).
        prompts_file: Prompts for the decode timing (the first one is timed); unset uses the defaults.
        new_tokens: Tokens generated per timed decode.
        repeats: Timed repeats (median reported), after one discarded warm-up.
        prefill_tokens: Prompt length of the prefill timing.
        kl_tokens: Held-out positions compared with the reference.
        hf_baseline: Also time transformers' ``generate`` on each variant.
        ppl_tolerance: A variant qualifies for fine-tuning if its perplexity is within this fraction of
            the reference's; the fastest qualifying decode wins, less peak memory breaking ties.
        timeout_per_variant: Seconds before a variant is stopped and reported failed.
        resume: Reuse variants already measured in ``output_dir``.
    """

    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    output_dir: str | None = None
    overrides: str = ""
    data: str | None = None
    reference: str = "bf16-sdpa"
    prompts_file: str | None = None
    new_tokens: int = 64
    repeats: int = 3
    prefill_tokens: int = 512
    kl_tokens: int = 2048
    hf_baseline: bool = True
    ppl_tolerance: float = 0.05
    timeout_per_variant: int = 1800
    resume: bool = False

    def check(self) -> None:
        """Refuse impossible settings before any variant runs."""
        for name in ("new_tokens", "repeats", "prefill_tokens", "kl_tokens", "timeout_per_variant"):
            if getattr(self, name) < 1:
                raise ConfigError(f"compare --{name} must be >= 1, got {getattr(self, name)}.")
        if self.ppl_tolerance < 0:
            raise ConfigError(f"compare --ppl_tolerance must be >= 0, got {self.ppl_tolerance}.")
        if not self.variants:
            raise ConfigError("compare --variants is empty; name at least one variant config.")
        if self.output_dir:
            check_writable_folder(self.output_dir, "compare --output_dir")
        if self.data:
            check_data_option(self.data)

    def data_arguments(self) -> list[str]:
        """The CLI arguments that put ``data`` in every variant's run (none for the book)."""
        if not self.data:
            return []
        if is_config_file(self.data):
            return ["-c", self.data]
        return ["--data.class_path", "datamodules.TextCorpusDataModule", "--data.path", self.data]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def save(self, path: Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> StudySettings:
        return cls.from_dict(json.loads(Path(path).read_text()))


def resolve_variant(entry: str) -> Path:
    """A variant's config file: the path as given, else under ``configs/``, else ``configs/variants/``."""
    path = Path(entry).expanduser()
    if path.suffix != ".yaml":
        path = path.with_suffix(".yaml")
    for candidate in (path, REPO_CONFIGS / path, REPO_CONFIGS / "variants" / path.name):
        if candidate.is_file():
            return candidate.resolve()
    return path


def variant_name(entry: str) -> str:
    """A variant's name: its config file's stem (``configs/variants/nf4-sdpa.yaml`` -> ``nf4-sdpa``)."""
    return resolve_variant(entry).stem


def configured_source(entry: str, overrides: str) -> str | None:
    """The ``model.source`` a variant runs with: its config files' (bases first) unless the overrides set one."""
    import shlex

    import yaml

    from smarter.config_files import expand_config_file

    words = shlex.split(overrides)
    for index, word in enumerate(words):
        if word == "--model.source" and index + 1 < len(words):
            return words[index + 1]
        if word.startswith("--model.source="):
            return word.split("=", 1)[1]
    source = None
    try:
        expanded = expand_config_file(resolve_variant(entry))
    except ConfigError:
        return None  # the variant's own run reports it
    for value in expanded[1::2]:  # -c VALUE pairs: a file or inline YAML text
        path = Path(value)
        try:
            content = yaml.safe_load(path.read_text() if path.suffix == ".yaml" and path.is_file() else value)
        except (OSError, yaml.YAMLError):
            continue
        model = content.get("model") if isinstance(content, dict) else None
        found = (model or {}).get("source") or ((model or {}).get("init_args") or {}).get("source")
        source = found or source
    return source
