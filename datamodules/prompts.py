"""Prompts for ``predict``: read from a file or the config, wrapped in Mistral's instruction format."""

from __future__ import annotations

import json
from pathlib import Path

from foundation import ConfigError

DEFAULT_PROMPTS = [
    "Who is Long John Silver, and why do the pirates follow him?",
    "Describe the Admiral Benbow inn on the night the captain arrives.",
    "What does it mean when a pirate is given the black spot?",
    "Write the opening lines of a sea shanty about buried treasure.",
]


def read_prompts_file(path: str) -> list[str]:
    """Prompts from a file: one per line (``.txt``), or JSON Lines with a ``prompt`` field (``.jsonl``).

    Raises:
        ConfigError: when the file is missing, unreadable, malformed or holds no prompt.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"data.prompts_file={path!r} is not a file; give a text file with one prompt per line.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"data.prompts_file={path!r} is not UTF-8 text.") from None
    prompts: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix == ".jsonl":
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(
                    f"{path}:{number} is not a JSON object with a 'prompt' field; "
                    'write one {"prompt": "..."} per line, or use a .txt file.'
                ) from None
        else:
            prompts.append(line.strip())
    if not prompts:
        raise ConfigError(f"data.prompts_file={path!r} holds no prompt; put one prompt per line.")
    return prompts


def instruction_text(prompt: str) -> str:
    """Mistral-7B-Instruct's format (v0.1/v0.2); the tokenizer adds BOS in front."""
    return f"[INST] {prompt.strip()} [/INST]"
