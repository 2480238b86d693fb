"""The ``smarter`` command: LightningCLI over the Mistral module and the Treasure Island data."""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from callbacks.prediction_writer import JsonlPredictionWriter
from datamodules.treasure_island import TreasureIslandDataModule
from lightning_modules.mistral_module import MistralModule
from smarter.errors import ConfigError

# Trainer overrides for programmatic runs (study probe, benchmarks): no logger, bar or summary.
HEADLESS_TRAINER_ARGS = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


class SmarterCLI(LightningCLI):
    """LightningCLI with this framework's defaults (TensorBoard logs under ``runs/``).

    ``predict`` always writes ``predictions.jsonl`` in the run's log folder (unless a
    ``JsonlPredictionWriter`` is configured with its own path).
    """

    def before_predict(self) -> None:
        if not any(isinstance(c, JsonlPredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(JsonlPredictionWriter())

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "lightning_modules.MistralModule"},
                "data": {"class_path": "datamodules.TreasureIslandDataModule"},
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "default"},
                },
            }
        )


def quiet_known_warnings() -> None:
    """Silence warnings this framework already handles, so real ones stand out."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")


def build_cli(args: list[str] | None = None, run: bool = True) -> SmarterCLI:
    """The CLI over the Mistral module and the Treasure Island data (both subclassable).

    Args:
        args: Command-line arguments; unset reads ``sys.argv``.
        run: Run the subcommand; with False, only parse and instantiate (no subcommand given).
    """
    return SmarterCLI(
        MistralModule,
        TreasureIslandDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``smarter`` console command."""
    quiet_known_warnings()
    argv = sys.argv[1:] if args is None else args
    try:
        if argv and argv[0] == "compare":
            from smarter.study import compare_main

            compare_main(argv[1:])
            return
        build_cli(argv)
    except ConfigError as error:
        print(f"smarter: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
