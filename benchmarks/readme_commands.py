"""The commands the README shows, read from its text, and where each one can run.

The CPU test suite runs every ``cpu`` command as written (tests/test_user_paths.py), and the GPU recipe
matrix (benchmarks/recipe_matrix.py) runs the ``gpu`` ones; ``real-weights`` commands need a download and
``two-gpus`` ones two GPUs. A README change that breaks a command, or adds one that nothing runs, fails a test.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from smarter.study.settings import configured_source  # noqa: E402

# the model sources a CPU runs in minutes: the tiny preset, or what a tiny run exported under runs/
CPU_SOURCES = ("tiny",)
# the repository's packages: ``python -m <package>.<script>`` runs one of its scripts (on a CPU)
OWN = ("datamodules", "lightning_modules", "callbacks", "smarter")
KINDS = ("cpu", "gpu", "two-gpus", "real-weights", "install", "tests", "viewer")


@dataclass(frozen=True)
class ReadmeCommand:
    """One command of the README.

    Args:
        text: The command as written (one part of a ``&&`` chain, its comment dropped).
        kind: Where it runs: ``cpu``, ``gpu``, ``two-gpus``, ``real-weights`` (a download), ``install``,
            ``tests`` (the test command) or ``viewer`` (TensorBoard).
        env: Variables set in front of it (``PYTHONPATH=tests smarter ...``).
        argv: Its words after the program name.
    """

    text: str
    kind: str
    env: dict[str, str] = field(default_factory=dict)
    argv: tuple[str, ...] = ()


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def _option(argv: list[str], name: str) -> str | None:
    for index, word in enumerate(argv):
        if word == name and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _configs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in ("-c", "--config")]


def model_source(argv: list[str]) -> str | None:
    """The model a ``smarter`` command runs: ``--model.source``, the study's overrides, or its config files'."""
    source = _option(argv, "--model.source")
    if source:
        return source
    if argv and argv[0] == "compare":
        overrides = _option(argv, "--overrides") or ""
        variants = _option(argv, "--variants")
        entries = [v.strip() for v in variants.strip("[]").split(",")] if variants else ["bf16-sdpa"]
        return next((s for e in entries if (s := configured_source(e, overrides)) not in (None, "tiny")), "tiny")
    found = None
    for config in _configs(argv):
        found = configured_source(str(REPO / config), "") or found
    return found


def classify(argv: list[str]) -> str:
    """Where a ``smarter`` command (its words after ``smarter``) can run."""
    if any("mistralai/" in word or word.startswith("/models/") for word in argv):
        return "real-weights"
    if any(config.startswith("configs/distributed/") for config in _configs(argv)):
        return "two-gpus"
    if argv and argv[0] == "export":  # it builds the checkpoint's model wherever it runs (--device auto)
        return "cpu"
    source = model_source(argv)
    if source in CPU_SOURCES or (source or "").startswith("runs/"):
        return "cpu"
    return "gpu"


def _parse_part(part: str) -> ReadmeCommand | None:
    words = shlex.split(part, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if not words:
        return None
    program, argv = words[0], tuple(words[1:])
    text = part.split(" #", 1)[0].strip()
    if program == "smarter":
        return ReadmeCommand(text, classify(list(argv)), env, argv)
    if program in ("python", "python3") and argv[:1] == ("-m",) and len(argv) > 1 and argv[1].split(".")[0] in OWN:
        return ReadmeCommand(text, "cpu", env, argv)  # a script of this repository (the instruction-set maker)
    if program == "tensorboard":
        return ReadmeCommand(text, "viewer", env, argv)
    if "pytest" in words:
        return ReadmeCommand(text, "tests", env, argv)
    return ReadmeCommand(text, "install", env, argv)


def readme_commands(readme: Path = REPO / "README.md") -> list[ReadmeCommand]:
    """Every command in the README's ``bash`` blocks, in order (``a && b`` gives two)."""
    commands = []
    for block in _bash_blocks(readme.read_text(encoding="utf-8")):
        for line in block.splitlines():
            for part in line.split("&&"):
                if part.strip() and not part.strip().startswith("#"):
                    parsed = _parse_part(part.strip())
                    if parsed is not None:
                        commands.append(parsed)
    return commands


def readme_command(text: str, readme: Path = REPO / "README.md") -> ReadmeCommand:
    """The README's command that reads exactly ``text``; fails when the README no longer shows it."""
    for command in readme_commands(readme):
        if command.text == text:
            return command
    raise LookupError(f"the README shows no command `{text}`; update the README or this caller together")


if __name__ == "__main__":
    for command in readme_commands():
        print(f"{command.kind:13} {command.text}")
