"""LightningCLI's ``fit`` / ``validate`` / ``test`` / ``predict`` over the Mistral module and a token data module
(the book by default), with this framework's defaults, checks and outputs."""

from __future__ import annotations

import logging
import os
import warnings

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.checkpoint_io import AtomicCheckpointIO
from callbacks.interruption import StopOnSignal
from callbacks.last_checkpoint import LastCheckpointAtTrainEnd
from callbacks.model_export import ExportAtFitEnd
from callbacks.prediction_writer import JsonlPredictionWriter
from callbacks.strategies import check_strategy_fits_accumulation
from datamodules.token_data import TokenDataModule
from foundation import ConfigError, RunStopped, check_writable_folder, notify
from lightning_modules.checkpoints import read_checkpoint, refusal_message, setting_differences
from lightning_modules.generation import check_generation_fits
from lightning_modules.mistral_module import MistralModule
from smarter.config_files import expand_config_arguments, run_name
from smarter.errors import PROG, SmarterArgumentParser
from smarter.run_failures import run_failed

# Trainer overrides for programmatic runs (study probe, benchmarks): no logger, bar or summary.
HEADLESS_TRAINER_ARGS = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


# ---- the LightningCLI ------------------------------------------------------------------------------


def check_trainer_numbers(trainer) -> None:
    """Trainer settings Lightning takes but cannot run (a traceback mid-run) or runs wrongly (silently):
    ``accumulate_grad_batches`` 0 divides by zero and -1 stepped after every batch; ``val_check_interval`` 0
    divides by zero; a negative ``gradient_clip_val`` would scale gradients by a negative factor;
    ``max_steps``, ``max_epochs`` or ``limit_train_batches`` 0 train nothing."""
    accumulate = trainer.accumulate_grad_batches
    if accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches must be a whole number of at least 1, got {accumulate}.")
    interval = trainer.val_check_interval
    if isinstance(interval, int | float) and not interval > 0:  # NaN fails too
        raise ConfigError(
            f"trainer.val_check_interval must be a number of batches (at least 1) or a fraction of the epoch "
            f"in (0, 1], got {interval}."
        )
    clip = trainer.gradient_clip_val
    if clip is not None and not clip >= 0:  # NaN fails too
        raise ConfigError(f"trainer.gradient_clip_val must be positive (or unset for no clipping), got {clip}.")
    # 0 is taken by Lightning and trains nothing, and fit would then export the untrained model as trained
    limits = (trainer.max_steps, trainer.max_epochs, trainer.limit_train_batches)
    for name, value in zip(("max_steps", "max_epochs", "limit_train_batches"), limits, strict=True):
        if value is not None and value == 0:
            raise ConfigError(
                f"trainer.{name} {value} trains nothing (and fit would export the model as trained); set it "
                "above 0, or score the model with `smarter validate`."
            )


def requirements_of(model: MistralModule):
    """What the data needs from the model (tokenizer, maximum positions, vocabulary)."""
    return model.input_requirements


class SmarterCLI(LightningCLI):
    """LightningCLI with this framework's defaults and checks.

    - TensorBoard logs under ``runs/<run name>/``, the run named after the first config file given;
    - the data module receives the model's ``input_requirements`` (its tokenizer, maximum positions
      and vocabulary), linked here, so neither reaches into the other at run time;
    - ``--ckpt_path`` is checked against the configured model before anything loads, and never
      replaces a configured setting (Lightning's CLI would take the checkpoint's);
    - checkpoints are written atomically; SIGTERM / SIGINT stop at a clean point (``StopOnSignal``);
      ``fit`` exports the trained model when it ends (``ExportAtFitEnd``); ``predict`` writes
      ``predictions.jsonl`` in the run's log folder (unless a ``JsonlPredictionWriter`` is configured);
    - before a run starts, its outputs are checked (writable folders, no predictions file to
      overwrite, prompts that fit the model), so a refused run changes no file.
    """

    def __init__(self, *args, run_name: str = "default", **kwargs) -> None:
        self.run_name = run_name
        super().__init__(*args, **kwargs)

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
        parser.add_argument(
            "--print_plan",
            action="store_true",
            help="Print the execution plan (kernels, loss, compiled layers, CUDA graphs, checkpointing, adapters' "
            "dtype, decoder) that this command would run here, each choice with its reason, and exit before "
            "any weights load.",
        )

    # ---- checkpoints ---------------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` against the configured model; take no setting from it.

        Replaces LightningCLI's own step, which loads the checkpoint's hyperparameters over what the
        user configured (a 3-layer checkpoint silently turning a 2-layer config into a 3-layer run).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        checkpoint = read_checkpoint(ckpt_path, what="--ckpt_path")
        model_config = self.config[subcommand]["model"]
        configured = model_config.init_args.as_dict() if hasattr(model_config, "init_args") else {}
        refusals, _ = setting_differences(configured, checkpoint["hyper_parameters"])
        if refusals:
            raise ConfigError(refusal_message(ckpt_path, refusals))

    def instantiate_trainer(self, **kwargs):
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        try:
            return super().instantiate_trainer(**kwargs)
        except MisconfigurationException as error:  # e.g. more devices than the machine has
            message = " ".join(str(error).split())
            if "No supported gpu backend found" in message:
                raise ConfigError(
                    "trainer.accelerator gpu needs a CUDA GPU and none is visible here (configs/distributed/*.yaml "
                    "are GPU configs); to run processes on this machine's CPUs instead, add --trainer.accelerator "
                    "cpu --trainer.strategy ddp --trainer.devices 2 (FSDP runs on GPUs only)."
                ) from None
            raise ConfigError(f"the trainer settings cannot run here: {message}") from None

    # ---- before each run: its add-ons and its checks ------------------------------------------------
    def _prepare_run(self, subcommand: str) -> None:
        trainer = self.trainer
        callbacks = trainer.callbacks
        if subcommand == "fit" and not any(isinstance(c, ExportAtFitEnd) for c in callbacks):
            callbacks.append(ExportAtFitEnd())
        if subcommand == "fit" and not any(isinstance(c, LastCheckpointAtTrainEnd) for c in callbacks):
            callbacks.insert(0, LastCheckpointAtTrainEnd())
        if subcommand == "predict" and not any(isinstance(c, JsonlPredictionWriter) for c in callbacks):
            callbacks.append(JsonlPredictionWriter())
        if not any(isinstance(c, StopOnSignal) for c in callbacks):
            callbacks.append(StopOnSignal())  # last: it acts after the others have seen the batch
        self._check_outputs(subcommand)
        monitors = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
        if subcommand == "fit" and monitors and not trainer.loggers:  # Lightning stops fit: nowhere to write
            for monitor in monitors:
                callbacks.remove(monitor)
            notify("trainer.logger is off, so the learning-rate monitor of the config is left out.")

    def _check_outputs(self, subcommand: str) -> None:
        trainer = self.trainer
        for logger in trainer.loggers:
            root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
            if root:
                check_writable_folder(root, "trainer.logger save_dir")
        check_writable_folder(trainer.default_root_dir, "trainer.default_root_dir")
        for callback in trainer.callbacks:
            if isinstance(callback, JsonlPredictionWriter) and subcommand == "predict":
                check_writable_folder(callback.target(trainer).parent, "the predictions folder")
                callback.check_target(trainer)
            if isinstance(callback, ExportAtFitEnd) and subcommand == "fit":
                callback.check_target(trainer)
            dirpath = getattr(callback, "dirpath", None)
            if dirpath:
                check_writable_folder(dirpath, "the checkpoint folder")
        if subcommand == "fit":
            if hasattr(self.model, "check_can_fit"):
                self.model.check_can_fit()
            check_trainer_numbers(trainer)
            check_strategy_fits_accumulation(trainer)
        # what will run: resolved once, here, before any weights load; its refusals are this run's
        plan = self.model.resolve_plan(subcommand, trainer.strategy)
        if self.config[subcommand].get("print_plan"):
            print(plan.describe(), flush=True)
            raise SystemExit(0)
        if subcommand != "predict" and hasattr(self.datamodule, "check_ready"):
            self.datamodule.check_ready()
        if subcommand == "fit" and hasattr(self.datamodule, "check_batch_fits"):
            self.datamodule.check_batch_fits()
        if subcommand == "predict":
            module, datamodule = self.model, self.datamodule
            max_new = module.generation.max_new_tokens
            for index, item in enumerate(datamodule.prompt_items()):
                check_generation_fits(len(item["input_ids"]), max_new, module.max_positions, f"prompt {index + 1}")

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a failure of the machine (out of memory, a full disk, a lost process) ends as one line that
        names the cause and the last checkpoint, its traceback written to a log file in the run's folder."""
        try:
            super()._run_subcommand(subcommand)
        except (RunStopped, ConfigError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:
            failed = run_failed(error, subcommand, self.trainer)
            if failed is None:
                raise
            raise failed from None

    def before_fit(self) -> None:
        self._prepare_run("fit")

    def before_validate(self) -> None:
        self._prepare_run("validate")

    def before_test(self) -> None:
        self._prepare_run("test")

    def before_predict(self) -> None:
        self._prepare_run("predict")


def _not_a_tip(record: logging.LogRecord) -> bool:
    return "💡 Tip:" not in record.getMessage()


def _not_the_cpu_kernels_notice(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


def quiet_known_warnings() -> None:
    """Silence warnings and notices this framework already handles, so real ones stand out."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python.*")
    warnings.filterwarnings("ignore", message=".*`past_key_values` is deprecated.*")  # renamed after 5.24
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_a_tip)  # once: a filter already added is not added again
    # bitsandbytes on a CPU looks for an optional kernel package on every load and says so
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_cpu_kernels_notice)


def build_cli(args: list[str], run: bool = True) -> SmarterCLI:
    """The CLI over the Mistral module and a token data module (the book by default; both subclassable).

    Args:
        args: Command-line arguments (a subcommand first when ``run``); config files that
            ``extends`` others are expanded first.
        run: Run the subcommand; with False, only parse and instantiate (no subcommand given).
    """
    return SmarterCLI(
        MistralModule,
        TokenDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_class=SmarterArgumentParser,
        parser_kwargs={"prog": PROG},
        args=expand_config_arguments(list(args)),
        run=run,
        run_name=stage_run_name(args) if run else run_name(args),
    )


def stage_run_name(args: list[str]) -> str:
    """The logger's run name: the first config file's stem for ``fit``, and ``<stem>/<command>`` for validate,
    test and predict, so that scoring and generating runs never mix with the training runs of that name
    (``runs/tiny/version_0`` trains; ``runs/tiny/validate/version_0`` scores)."""
    name = run_name(args)
    command = args[0] if args else "fit"
    return name if command == "fit" else f"{name}/{command}"
