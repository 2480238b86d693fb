"""The ``smarter`` command: LightningCLI's ``fit`` / ``validate`` / ``test`` / ``predict`` over the Mistral
module and the Treasure Island data, plus the framework's own commands (``compare``), one registry.

Every error meant for the user comes out as one line, ``smarter: error: ...``, with exit status 2.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.prediction_writer import JsonlPredictionWriter
from datamodules.treasure_island import TreasureIslandDataModule
from foundation import find_config_error
from lightning_modules.mistral_module import MistralModule
from smarter.config_files import expand_config_arguments, run_name

PROG = "smarter"

# Trainer overrides for programmatic runs (study probe, benchmarks): no logger, bar or summary.
HEADLESS_TRAINER_ARGS = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]

# ---- one-line parser errors ------------------------------------------------------------------------

_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
)


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested error text as one line: the dotted key and the innermost reason."""
    keys: list[str] = []
    detail = ""
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_NOISE):
            continue
        key = re.match(r'(?:Parser key|Key) "([^"]+)":\s*(.*)', line)
        if key:
            keys.append(key.group(1))
            if key.group(2) and not key.group(2).startswith(_NOISE):
                detail = key.group(2)
                break
            continue
        detail = line
        break
    literal = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", detail)
    if literal:
        detail = f"{literal.group(2)!r} is not one of {literal.group(1)}"
    dotted = ".".join(k for k in keys if k != "init_args")
    text = f"{dotted}: {detail}" if dotted and detail else (detail or message.strip().splitlines()[0])
    return " ".join(text.split())


class SmarterArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one line that names the key and the fix."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parser: jsonargparse catches this and tries alternatives
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        fail(f"{condense_parser_error(message)} (see `{prog} --help`)")


def fail(message: str) -> NoReturn:
    """Print ``smarter: error: message`` and exit with status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ---- the LightningCLI ------------------------------------------------------------------------------


def requirements_of(model: MistralModule):
    """What the data needs from the model (tokenizer, maximum positions, vocabulary)."""
    return model.input_requirements


class SmarterCLI(LightningCLI):
    """LightningCLI with this framework's defaults.

    - TensorBoard logs under ``runs/<run name>/``, the run named after the first config file given;
    - the data module receives the model's ``input_requirements`` (its tokenizer, maximum positions
      and vocabulary), linked here, so neither reaches into the other at run time;
    - ``predict`` always writes ``predictions.jsonl`` in the run's log folder (unless a
      ``JsonlPredictionWriter`` is configured with its own path).
    """

    def __init__(self, *args, run_name: str = "default", **kwargs) -> None:
        self.run_name = run_name
        super().__init__(*args, **kwargs)

    def before_predict(self) -> None:
        if not any(isinstance(c, JsonlPredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(JsonlPredictionWriter())

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "lightning_modules.MistralModule"},
                "data": {"class_path": "datamodules.TreasureIslandDataModule"},
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": self.run_name, "default_hp_metric": False},
                },
            }
        )
        parser.link_arguments(
            "model", "data.init_args.model_requirements", compute_fn=requirements_of, apply_on="instantiate"
        )


def quiet_known_warnings() -> None:
    """Silence warnings and notices this framework already handles, so real ones stand out."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python.*")
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "💡 Tip:" not in record.getMessage())


def build_cli(args: list[str], run: bool = True) -> SmarterCLI:
    """The CLI over the Mistral module and the Treasure Island data (both subclassable).

    Args:
        args: Command-line arguments (a subcommand first when ``run``); config files that
            ``extends`` others are expanded first.
        run: Run the subcommand; with False, only parse and instantiate (no subcommand given).
    """
    return SmarterCLI(
        MistralModule,
        TreasureIslandDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_class=SmarterArgumentParser,
        parser_kwargs={"prog": PROG},
        args=expand_config_arguments(list(args)),
        run=run,
        run_name=run_name(args),
    )


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


COMMANDS: dict[str, Command] = {
    "fit": Command("Train (LoRA, QLoRA or full) on the book's training chapters.", _lightning("fit")),
    "validate": Command("Score the validation chapters: loss, perplexity, bits per byte.", _lightning("validate")),
    "test": Command("Score the test chapters: loss, perplexity, bits per byte.", _lightning("test")),
    "predict": Command("Generate completions for prompts, timed, into predictions.jsonl.", _lightning("predict")),
    "compare": Command(
        "The variant study: speed, memory, kernels and quality of each variant, with a report.", _compare
    ),
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
    except Exception as error:
        config_error = find_config_error(error)
        if config_error is None:
            raise
        fail(str(config_error))


if __name__ == "__main__":
    main()
