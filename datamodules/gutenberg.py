"""Getting and cleaning a Project Gutenberg plain-text book: fetch, decode, strip, split by chapter."""

from __future__ import annotations

import re
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from foundation import ConfigError, atomic_path

TREASURE_ISLAND_URL = "https://www.gutenberg.org/cache/epub/120/pg120.txt"
BOOK_PATH_ENV = "TREASURE_ISLAND_PATH"

_START_MARKER = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M)
_END_MARKER = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M)
_ROMAN_HEADING = re.compile(r"^(?=[IVXLC]+$)M*(C[MD]|D?C{0,3})(X[CL]|L?X{0,3})(I[XV]|V?I{0,3})$")
_PART_HEADING = re.compile(r"^PART [A-Z]+--")


class BookUnavailableError(ConfigError):
    """The book is neither on disk nor downloadable."""


@dataclass(frozen=True)
class Chapter:
    """One chapter: its 1-based number, its title line and its text (title included)."""

    number: int
    title: str
    text: str


def download_book(url: str, destination: Path, timeout_s: float = 30.0) -> Path:
    """Download ``url`` to ``destination`` atomically, showing progress.

    Args:
        url: Address of the plain-text book.
        destination: File to write; a partial download never replaces it.
        timeout_s: Network timeout per read.

    Raises:
        BookUnavailableError: when the download fails (no network, HTTP error).
    """
    from tqdm.auto import tqdm

    try:
        with (
            atomic_path(destination) as staging,
            urllib.request.urlopen(url, timeout=timeout_s) as response,
        ):
            total = int(response.headers.get("Content-Length") or 0) or None
            with (
                open(staging, "wb") as out,
                tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {url}") as bar,
            ):
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as error:
        raise BookUnavailableError(
            f"Could not download {url} ({error}). Give a local copy of the book: set "
            f"data.book_path in the config or the {BOOK_PATH_ENV} environment variable."
        ) from error
    return destination


def read_utf8_text(path: Path) -> str:
    """Read ``path`` as UTF-8 text with Unix line endings.

    Raises:
        ConfigError: when the file is not UTF-8 text.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path} is not UTF-8 text (bad byte at offset {error.start}); give the "
            "'Plain Text UTF-8' edition of the book (pg120.txt)."
        ) from None
    if not text.strip():
        raise ConfigError(f"{path} is empty; give the book's plain text (pg120.txt).")
    if "\x00" in text:
        raise ConfigError(f"{path} holds NUL bytes, so it is not a plain-text book; give pg120.txt.")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg_boilerplate(text: str) -> str:
    """Keep only the text between the Gutenberg START and END markers.

    A text without the markers (an already-cleaned copy) is returned whole, with a warning.
    """
    start = _START_MARKER.search(text)
    end = _END_MARKER.search(text)
    if start is None or end is None:
        warnings.warn(
            "No Project Gutenberg START/END markers found: using the whole text as the book.",
            stacklevel=2,
        )
        return text.strip()
    if end.start() < start.end():
        raise ConfigError("The Gutenberg END marker comes before the START marker; the file is damaged.")
    body = text[start.end() : end.start()].strip()
    if not body:
        raise ConfigError("The book holds no text between the Gutenberg START and END markers; the file is damaged.")
    return body


def split_into_chapters(book: str) -> list[Chapter]:
    """Split the book body into chapters at the lines that hold only a roman numeral.

    The front matter (title, dedication, contents) and the "PART ..." lines are dropped:
    the contents lists every chapter title, so it belongs to no split.

    Raises:
        ConfigError: when no chapter heading is found.
    """
    lines = book.split("\n")
    starts = [i for i, line in enumerate(lines) if _ROMAN_HEADING.match(line.strip())]
    if not starts:
        raise ConfigError(
            "No chapter headings (a line holding only a roman numeral, e.g. 'XII') were found; "
            "the chapter split needs the book's own chapter headings."
        )
    chapters = []
    for number, (begin, stop) in enumerate(zip(starts, [*starts[1:], len(lines)], strict=False), start=1):
        body = [line.rstrip() for line in lines[begin + 1 : stop] if not _PART_HEADING.match(line)]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip()
        title = text.split("\n", 1)[0]
        chapters.append(Chapter(number=number, title=title, text=text))
    return chapters
