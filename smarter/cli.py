"""The ``smarter`` command: one registry of its subcommands (LightningCLI's ``fit`` / ``validate`` / ``test`` /
``predict``, and the framework's own ``compare`` and ``export``) and its entry point.

Every error meant for the user comes out as one line, ``smarter: error: ...``, with exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from foundation import RunStopped, find_config_error, is_global_zero
from smarter.errors import PROG, fail
from smarter.lightning_cli import build_cli, quiet_known_warnings

# ---- the command registry --------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One ``smarter`` command: its one-line summary and what runs it with the remaining arguments."""

    summary: str
    run: Callable[[list[str]], object]


def _lightning(subcommand: str) -> Callable[[list[str]], object]:
    return lambda args: build_cli([subcommand, *args])


def _compare(args: list[str]) -> None:
    from smarter.study.command import compare_main

    compare_main(args)


def _export(args: list[str]) -> None:
    from smarter.export_command import export_main

    export_main(args)


COMMANDS: dict[str, Command] = {
    "fit": Command("Train (LoRA, QLoRA or full) on the book or your data (configs/data/).", _lightning("fit")),
    "validate": Command("Score the validation split: loss, perplexity, bits per byte.", _lightning("validate")),
    "test": Command("Score the test split: loss, perplexity, bits per byte.", _lightning("test")),
    "predict": Command("Generate completions for prompts, timed, into predictions.jsonl.", _lightning("predict")),
    "compare": Command(
        "The variant study: speed, memory, kernels and quality of each variant, with a report.", _compare
    ),
    "export": Command("Write a checkpoint's model as Hugging Face folders: PEFT adapter, merged, or whole.", _export),
}


def help_text() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help documents each one)",
        "",
        "Compare quantized / attention-optimized Mistral variants and fine-tune the best one.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()),
    ]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``smarter`` console command."""
    quiet_known_warnings()
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text())
        if not argv:
            fail(f"name a command: {', '.join(COMMANDS)}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        fail(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)} (see `{PROG} --help`)")
    try:
        COMMANDS[name].run(rest)
    except SystemExit:
        raise
    except RunStopped as stopped:
        if is_global_zero():  # every process of a distributed run stops with it; the first one says so
            print(f"{PROG}: {stopped.label}: {stopped}", file=sys.stderr, flush=True)
        raise SystemExit(stopped.exit_code) from None
    except Exception as error:
        config_error = find_config_error(error)
        if config_error is None:
            raise
        fail(str(config_error))


if __name__ == "__main__":
    main()
