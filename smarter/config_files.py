"""Composed config files: a file names the files it builds on under ``extends:``.

``smarter fit -c configs/variants/nf4-sdpa.yaml`` with a variant file that says
``extends: ../base/mistral-7b.yaml`` runs exactly as ``-c configs/base/mistral-7b.yaml -c
configs/variants/nf4-sdpa.yaml`` would: the ``-c`` arguments are expanded, bases first (recursively,
paths relative to the file that names them), before LightningCLI parses them. Later files override
earlier ones key by key, as repeated ``-c`` always does.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from foundation import ConfigError

EXTENDS_KEY = "extends"
CONFIG_FLAGS = ("-c", "--config")


def _config_values(args: list[str]) -> list[tuple[int, int, str]]:
    """(first index, last index, value) of every config argument in ``args``."""
    found = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in CONFIG_FLAGS and index + 1 < len(args):
            found.append((index, index + 1, args[index + 1]))
            index += 2
            continue
        for flag in CONFIG_FLAGS:
            if arg.startswith(flag + "="):
                found.append((index, index, arg[len(flag) + 1 :]))
        index += 1
    return found


def config_files_named(args: list[str]) -> list[Path]:
    """The config files the user named with ``-c`` / ``--config``, in order (before expansion)."""
    return [Path(value) for _, _, value in _config_values(args) if Path(value).suffix in (".yaml", ".yml", ".json")]


def _read_yaml(path: Path) -> dict:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML ({str(error).splitlines()[0]}); fix the file.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Cannot read the config file {path} ({error}).") from None
    return content if isinstance(content, dict) else {}


def expand_config_file(path: Path, chain: tuple[Path, ...] = ()) -> list[str]:
    """The ``-c`` arguments that stand for ``path``: its bases (recursively), then its own content.

    A file without ``extends`` stands for itself. A file with it stands for its bases' arguments
    followed by its content without the ``extends`` key (passed as YAML text).
    """
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"Config files extend each other in a cycle ({cycle}); remove one `extends`.")
    if not path.is_file():
        return ["-c", str(path)]  # the parser reports a missing file itself
    content = _read_yaml(path)
    if EXTENDS_KEY not in content:
        return ["-c", str(path)]
    bases = content.pop(EXTENDS_KEY)
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: `extends` must be a path or a list of paths, got {bases!r}.")
    expanded: list[str] = []
    for base in bases:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path} extends {base}, which is not a file ({base_path}); fix the path.")
        expanded += expand_config_file(base_path, (*chain, resolved))
    if content:
        expanded += ["-c", yaml.safe_dump(content, sort_keys=False)]
    return expanded


def expand_config_arguments(args: list[str]) -> list[str]:
    """``args`` with every config file that uses ``extends`` replaced by its expansion."""
    expanded: list[str] = []
    cursor = 0
    for first, last, value in _config_values(args):
        expanded += args[cursor:first]
        expanded += (
            expand_config_file(Path(value)) if Path(value).suffix in (".yaml", ".yml") else args[first : last + 1]
        )
        cursor = last + 1
    return expanded + args[cursor:]


def run_name(args: list[str], default: str = "default") -> str:
    """A run's name: the stem of the first config file named (``configs/variants/nf4-sdpa.yaml`` -> ``nf4-sdpa``)."""
    named = config_files_named(args)
    return named[0].stem if named else default
