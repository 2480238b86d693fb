"""An instruction set made from Treasure Island, for trying instruction tuning with no download.

Two kinds of question, each answerable from the book alone:

- "Who says ...?": a line of dialogue from the book (“Budge, you skulk!” cried Pew) and its speaker (Pew);
- "What comes next?": a sentence of the book and the sentence that follows it.

Run ``python -m datamodules.book_instructions --output book-qa.jsonl`` (the book comes from ``--book``,
``$TREASURE_ISLAND_PATH`` or a download); the file is JSON Lines of ``{"prompt", "response"}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import sys
from pathlib import Path

from datamodules.gutenberg import (
    BOOK_PATH_ENV,
    TREASURE_ISLAND_URL,
    download_book,
    read_utf8_text,
    split_into_chapters,
    strip_gutenberg_boilerplate,
)
from foundation import ConfigError, atomic_write_text, cache_folder

_SPEAKER = (
    r"(?:the (?:captain|doctor|squire|coxswain|cook|stranger|blind man)"
    r"|(?:Mr\.|Dr\.|Captain|Long|Black|Ben|Israel|Tom|George|Abraham|Job) [A-Z][a-z]+|[A-Z][a-z]+|I\b)"
)
DIALOGUE = re.compile(r"“([^“”]{12,160}?)[,!?]” (?:said|cried|returned|replied|asked|says|added) (" + _SPEAKER + r")")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z“])")
NAMES = {"I": "Jim Hawkins", "the doctor": "Dr. Livesey", "the squire": "Squire Trelawney"}


def dialogue_samples(text: str) -> list[dict[str, str]]:
    """(line, speaker) pairs: "Who says ...?" with the speaker's name as the answer."""
    samples = []
    for match in DIALOGUE.finditer(text):
        line = " ".join(match.group(1).split())
        speaker = NAMES.get(match.group(2), match.group(2))
        speaker = speaker[0].upper() + speaker[1:]
        samples.append({"prompt": f"In Treasure Island, who says “{line}”?", "response": f"{speaker}."})
    return samples


def next_sentence_samples(text: str, rng: random.Random, count: int) -> list[dict[str, str]]:
    """Consecutive sentences of one paragraph: "What comes next?" with the following sentence as the answer."""
    pairs = []
    for paragraph in text.split("\n\n"):
        sentences = [" ".join(s.split()) for s in SENTENCE_END.split(paragraph) if s.strip()]
        for first, second in itertools.pairwise(sentences):
            if 30 <= len(first) <= 200 and 20 <= len(second) <= 200:
                pairs.append((first, second))
    rng.shuffle(pairs)
    return [
        {"prompt": f"In Treasure Island, what comes right after: “{first}”", "response": second}
        for first, second in pairs[:count]
    ]


def book_instructions(book_text: str, next_sentences: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """The instruction set, shuffled with ``seed``."""
    chapters = split_into_chapters(strip_gutenberg_boilerplate(book_text))
    text = "\n\n".join(chapter.text for chapter in chapters)
    rng = random.Random(seed)
    samples = dialogue_samples(text) + next_sentence_samples(text, rng, next_sentences)
    rng.shuffle(samples)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.book_instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="JSON Lines file to write.")
    parser.add_argument("--book", help=f"The book's plain text; unset: ${BOOK_PATH_ENV}, else a download.")
    parser.add_argument("--next_sentences", type=int, default=400, help="How many 'what comes next' samples.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        book = args.book or os.environ.get(BOOK_PATH_ENV)
        if book:
            path = Path(book).expanduser()
            if not path.is_file():
                raise ConfigError(f"--book {book!r} is not a file; give the book's plain text (pg120.txt).")
        else:
            path = cache_folder() / "pg120.txt"
            if not path.is_file():
                try:
                    download_book(TREASURE_ISLAND_URL, path)
                except ConfigError as error:
                    reason = str(error).split(". Give a local copy")[0]
                    raise ConfigError(f"{reason}; give a local copy with --book or ${BOOK_PATH_ENV}.") from None
        if args.next_sentences < 0:
            raise ConfigError(f"--next_sentences must be >= 0, got {args.next_sentences}.")
        samples = book_instructions(read_utf8_text(path), args.next_sentences, args.seed)
    except ConfigError as error:
        print(f"book_instructions: error: {error}", file=sys.stderr)
        return 2
    atomic_write_text(args.output, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    print(f"wrote {len(samples)} samples to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
