"""Reading a user's data: text files, JSON Lines and Hugging Face datasets on disk, with one-line errors.

Every record keeps where it came from (``notes/a.md``, ``qa.jsonl:12``, ``qa.parquet row 7``), so that an
error names the file and the line a user has to fix.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundation import ConfigError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
#: Files read through ``datasets.load_dataset(<format>, data_files=...)``.
DATASET_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}


@dataclass(frozen=True)
class Record:
    """One row of a user's data and where it came from."""

    origin: str
    fields: dict[str, Any]


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def find_data_files(path: str, option: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The files ``path`` names: a file, a folder (searched recursively) or a glob, sorted.

    A folder saved by ``datasets`` is returned whole, as one entry.
    """
    if not path:
        raise ConfigError(f"{option} is not set; give a file, a folder or a glob of {', '.join(suffixes)} files.")
    expanded = str(Path(path).expanduser())
    if any(char in path for char in "*?["):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        what = "glob"
    else:
        given = Path(expanded)
        if is_saved_dataset(given):
            return [given]
        if given.is_file():
            files, what = [given], "file"
        elif given.is_dir():
            files = sorted(f for f in given.rglob("*") if f.is_file() and not f.name.startswith("."))
            what = "folder"
        else:
            raise ConfigError(
                f"{option}={path!r} is not a file, a folder or a glob; give your data's path "
                f"({', '.join(suffixes)} files)."
            )
    if what == "file":
        if files[0].suffix not in suffixes:
            raise ConfigError(
                f"{option}={path!r} is a {files[0].suffix or 'suffix-less'} file; give {', '.join(suffixes)} files."
            )
        return files
    matched = [f for f in files if f.suffix in suffixes]
    if not matched:
        raise ConfigError(f"{option}={path!r} ({what}) holds no {', '.join(suffixes)} file; point it at your data.")
    return matched


def decode_utf8(path: Path) -> str:
    """The file's text with Unix line endings; a byte that is not UTF-8 is one error naming its line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line} is not UTF-8 text (byte 0x{raw[error.start]:02x} at column {column}); "
            "convert the file to UTF-8 (for example: iconv -f latin1 -t utf-8)."
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: Path) -> str:
    text = decode_utf8(path)
    if not text.strip():
        raise ConfigError(f"{path} is empty; remove it from the data or give it some text.")
    return text


def read_jsonl(path: Path) -> list[Record]:
    """Every non-blank line of a JSON Lines file, as a record named ``file:line``."""
    records = []
    for number, line in enumerate(decode_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"{path}:{number} is not valid JSON ({error.msg}); write one JSON object per line."
            ) from None
        if not isinstance(fields, dict):
            raise ConfigError(
                f"{path}:{number} is a JSON {type(fields).__name__}, not an object; write one object per line."
            )
        records.append(Record(f"{path}:{number}", fields))
    if not records:
        raise ConfigError(f"{path} is empty; remove it from the data or give it at least one JSON line.")
    return records


def read_dataset(path: Path, split: str | None = None) -> list[Record]:
    """Rows of a Hugging Face dataset on disk (``save_to_disk`` folder, or parquet / arrow / csv / json files),
    read locally with the optional ``datasets`` package."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{path} needs the 'datasets' package; install it (pip install 'scaling-smarter[datasets]') "
            "or convert the data to JSON Lines."
        ) from None
    try:
        if is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(DATASET_FORMATS[path.suffix], data_files=str(path))
    except Exception as error:  # the library's many error types: one line naming the file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path} could not be read as a dataset ({reason}).") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or ("train" if "train" in names else names[0])
        if chosen not in loaded:
            raise ConfigError(f"{path} has no split {chosen!r}; its splits are {names} (set data.dataset_split).")
        loaded = loaded[chosen]
    records = [Record(f"{path} row {index}", dict(row)) for index, row in enumerate(loaded)]
    if not records:
        raise ConfigError(f"{path} is empty; give a dataset with at least one row.")
    return records


def read_records(files: list[Path], dataset_split: str | None = None) -> list[Record]:
    """Records of JSON Lines files and datasets, in file order."""
    records: list[Record] = []
    for file in files:
        records += read_jsonl(file) if file.suffix in JSONL_SUFFIXES else read_dataset(file, dataset_split)
    return records


def field_value(record: Record, name: str, columns: dict[str, str], kinds: type | tuple = str) -> Any:
    """The record's value for our field ``name`` (renamed by ``columns``), checked for its type."""
    column = columns.get(name, name)
    if column not in record.fields:
        mapped = f" (mapped from data.columns.{name})" if name in columns else ""
        present = ", ".join(repr(key) for key in list(record.fields)[:6])
        raise ConfigError(
            f"{record.origin} has no {column!r} field{mapped}; it has {present or 'none'}. "
            f'Fix the row, or map your column with --data.columns \'{{"{name}": "<your column>"}}\'.'
        )
    value = record.fields[column]
    if not isinstance(value, kinds):
        raise ConfigError(f"{record.origin}: field {column!r} is a {type(value).__name__}, not text; fix the row.")
    return value
