"""Every bad input is one line, ``smarter: error: ...``, exit status 2, no traceback, and changes no file.

The cases here are listed, with their messages, in docs/bad_input.md (a test keeps the two in step);
``WRITE_BAD_INPUT_TABLE=1 python -m pytest tests/test_bad_input.py`` rewrites that table from the messages seen.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from helpers import QUIET, TINY
from smarter.cli import main

VALIDATE = ["validate", "-c", TINY, *QUIET]
FIT = ["fit", "-c", TINY, *QUIET]
PREDICT = ["predict", "-c", TINY, *QUIET]
QA = [*FIT, "-c", str(REPO_ROOT / "configs/data/instructions.yaml")]
CORPUS = [*FIT, "-c", str(REPO_ROOT / "configs/data/corpus.yaml")]


@dataclass(frozen=True)
class Case:
    """One bad input: what the user typed (``{tmp}`` is a scratch folder) and a part of the expected message."""

    name: str
    args: list[str]
    expected: str


CASES = [
    Case("block size below 2", [*VALIDATE, "--data.block_size", "1"], "data.block_size must be >= 2, got 1."),
    Case("batch size 0", [*FIT, "--data.batch_size", "0"], "data.batch_size must be >= 1, got 0."),
    Case("eval batch size 0", [*VALIDATE, "--data.eval_batch_size", "0"], "data.eval_batch_size must be >= 1"),
    Case("eval stride 0", [*VALIDATE, "--data.eval_stride", "0"], "data.eval_stride must be between 1 and block_size"),
    Case("eval stride above the block", [*VALIDATE, "--data.eval_stride", "999"], "got 999"),
    Case(
        "block size above the model's positions",
        [*VALIDATE, "--data.block_size", "4096"],
        "data.block_size=4096 exceeds the model's maximum positions (2048)",
    ),
    Case(
        "overlapping held-out chapters",
        [*VALIDATE, "--data.val_chapters", "[31, 32]", "--data.test_chapters", "[32, 33]"],
        "Chapters [32] are in both data.val_chapters and data.test_chapters",
    ),
    Case(
        "a chapter the book lacks", [*VALIDATE, "--data.val_chapters", "[99]"], "data.val_chapters names chapters [99]"
    ),
    Case("a negative worker count", [*VALIDATE, "--data.num_workers", "-1"], "data.num_workers must be >= 0"),
    Case("book path that is no file", [*VALIDATE, "--data.book_path", "{tmp}/nope.txt"], "is not a file"),
    Case("an empty book file", [*VALIDATE, "--data.book_path", "{tmp}/empty.txt"], "empty.txt is empty"),
    Case("a binary book file", [*VALIDATE, "--data.book_path", "{tmp}/binary.txt"], "is not UTF-8 text"),
    Case("a tokenizer that does not exist", [*VALIDATE, "--data.tokenizer", "{tmp}/no-tokenizer"], "No tokenizer"),
    Case("LoRA rank 0", [*FIT, "--model.lora.r", "0"], "model.lora.r must be >= 1, got 0."),
    Case("LoRA dropout 1.5", [*FIT, "--model.lora.r", "4", "--model.lora.dropout", "1.5"], "model.lora.dropout"),
    Case(
        "CUDA graphs with recomputed layers",
        [*FIT, "--model.compile", "layers-cudagraphs", "--model.activation_checkpointing", "every-layer"],
        "cannot recompute checkpointed layers",
    ),
    Case("keep -1 layers' activations", [*FIT, "--model.keep_last_layers", "-1"], "keep_last_layers must be >= 0"),
    Case(
        "a setting under a one-value key",
        [*FIT, "--model.activation_checkpointing.keep_last_layers", "1"],
        "it has no setting 'keep_last_layers' (did you mean --model.keep_last_layers 1?)",
    ),
    Case("LoRA compute in fp8", [*FIT, "--model.lora.r", "4", "--model.lora.compute", "fp8"], "lora.compute"),
    Case("an unknown LoRA target", [*FIT, "--model.lora.target_modules", "[qkv]"], "['qkv'] match no linear layer"),
    Case("no LoRA target", [*FIT, "--model.lora.target_modules", "[]"], "target_modules is empty"),
    Case("learning rate 0", [*FIT, "--model.learning_rate", "0"], "model.learning_rate must be > 0, got 0.0."),
    Case("negative warm-up", [*FIT, "--model.warmup_steps", "-1"], "model.warmup_steps must be >= 0"),
    Case("negative weight decay", [*FIT, "--model.weight_decay", "-0.1"], "model.weight_decay must be >= 0"),
    Case("minimum LR ratio above 1", [*FIT, "--model.min_lr_ratio", "2"], "model.min_lr_ratio must be between 0 and 1"),
    Case("a beta of 1.5", [*FIT, "--model.betas", "[0.9, 1.5]"], "model.betas must be two numbers in [0, 1)"),
    Case("an unknown quantization", [*VALIDATE, "--model.quantization", "int5"], "'int5' is not one of"),
    Case("an unknown attention", [*VALIDATE, "--model.attention", "flash9"], "'flash9' is not one of"),
    Case("an unknown dtype", [*VALIDATE, "--model.dtype", "float8"], "'float8' is not one of"),
    Case("4-bit weights in fp32", [*VALIDATE, "--model.quantization", "nf4"], "computes in 16-bit"),
    Case(
        "fitting a 4-bit base without LoRA",
        [*FIT, "--model.quantization", "nf4", "--model.dtype", "bfloat16"],
        "freezes the base weights",
    ),
    Case("an unknown preset field", [*VALIDATE, "--model.preset_overrides", "{layers: 3}"], "unknown MistralConfig"),
    Case("a source that does not exist", [*VALIDATE, "--model.source", "{tmp}/a/b/c"], "is not a preset"),
    Case(
        "an unreachable hub id",
        [*VALIDATE, "--model.source", "nobody-here/no-model"],
        "is not in this machine's Hugging Face cache and HF_HUB_OFFLINE is set",
    ),
    Case("a source that is a file", [*VALIDATE, "--model.source", "{tmp}/text.ckpt"], "is a file; give a Hugging Face"),
    Case("a source folder with no model", [*VALIDATE, "--model.source", "{tmp}"], "is a folder without a model"),
    Case(
        "fitting an adapter source without LoRA",
        [*FIT, "--model.source", "{tmp}/adapter"],
        "is a LoRA adapter, which fit trains further only with model.lora set to its shape (r 4, alpha 8",
    ),
    Case(
        "an adapter source with another LoRA shape",
        [*FIT, "--model.source", "{tmp}/adapter", "--model.lora.r", "16"],
        "but model.lora has r 16, alpha 32",
    ),
    Case(
        "held-out chapters that leave nothing to train on",
        [*VALIDATE, "--data.val_chapters", str(list(range(1, 21))), "--data.test_chapters", str(list(range(21, 35)))],
        "hold out all 34 chapters of the book, leaving nothing to train on",
    ),
    Case("a data cache under a file", [*VALIDATE, "--data.cache_dir", "{tmp}/a_file/cache"], "data.cache_dir="),
    Case("a model cache under a file", [*VALIDATE, "--model.cache_dir", "{tmp}/a_file/cache"], "model.cache_dir="),
    Case(
        "a root folder under a file",
        [*VALIDATE, "--trainer.logger", "false", "--trainer.default_root_dir", "{tmp}/a_file/root"],
        "trainer.default_root_dir=",
    ),
    Case(
        "a GPU config on a machine without a GPU",
        [*FIT, "-c", str(REPO_ROOT / "configs/distributed/ddp.yaml")],
        "trainer.accelerator gpu needs a CUDA GPU and none is visible here",
    ),
    Case(
        "a module class that cannot be imported",
        [*FIT, "--model", "my_package.ZLossModule"],
        "the module 'my_package' cannot be imported: it is not installed nor on the Python path",
    ),
    Case(
        "a study folder that is a file",
        ["compare", "--output_dir", "{tmp}/a_file", "--overrides", "--model.source tiny"],
        "compare --output_dir=",
    ),
    Case(
        "an export folder under a file",
        ["export", "--ckpt_path", "{tmp}/three-layers.ckpt", "--output_dir", "{tmp}/a_file/export"],
        "--output_dir=",
    ),
    Case("an unknown option", [*VALIDATE, "--model.layers", "3"], "model: Option 'layers' is not accepted"),
    Case("a number that is not one", [*FIT, "--trainer.max_steps", "ten"], "expected a whole number, got 'ten'"),
    Case("a config file that does not exist", ["fit", "-c", "{tmp}/nope.yaml"], "nope.yaml"),
    Case("a config file that is not YAML", ["fit", "-c", "{tmp}/broken.yaml"], "broken.yaml is not valid YAML"),
    Case("config files that extend each other", ["fit", "-c", "{tmp}/loop-a.yaml"], "extend each other in a cycle"),
    Case("zero new tokens", [*PREDICT, "--model.generation.max_new_tokens", "0"], "max_new_tokens must be >= 1"),
    Case("temperature 0", [*PREDICT, "--model.generation.temperature", "0"], "temperature must be > 0"),
    Case("top-p 1.5", [*PREDICT, "--model.generation.top_p", "1.5"], "top_p must be in (0, 1]"),
    Case(
        "a compiled decoder without a GPU",
        [*PREDICT, "--model.generation.decoder", "static-compiled"],
        "decoder=static-compiled needs a CUDA GPU",
    ),
    Case(
        "Triton matrix-vector kernels without a GPU",
        [*PREDICT, "--model.generation.decoder", "static", "--model.generation.matvec", "triton"],
        "matvec=triton needs a CUDA GPU and Triton",
    ),
    Case(
        "an unknown matvec",
        [*PREDICT, "--model.generation.matvec", "cublas"],
        "'cublas' is not one of 'auto', 'library', 'triton'",
    ),
    Case(
        "an unknown DDP gradient dtype",
        [
            *FIT,
            "--trainer.strategy",
            "callbacks.strategies.MistralDDPStrategy",
            "--trainer.strategy.gradient_reduce_dtype",
            "fp8",
        ],
        "gradient_reduce_dtype must be one of float32, bfloat16, got 'fp8'",
    ),
    Case(
        "a DDP gradient bucket of no size",
        [
            *FIT,
            "--trainer.strategy",
            "callbacks.strategies.MistralDDPStrategy",
            "--trainer.strategy.bucket_cap_mb",
            "-5",
        ],
        "bucket_cap_mb must be a positive number of megabytes, got -5",
    ),
    Case(
        "a DDP gradient bucket size that is not a number",
        [
            *FIT,
            "--trainer.strategy",
            "callbacks.strategies.MistralDDPStrategy",
            "--trainer.strategy.bucket_cap_mb",
            "lots",
        ],
        "bucket_cap_mb must be a positive number of megabytes, got 'lots'",
    ),
    Case(
        "a DDP flag that is neither true nor false",
        [
            *FIT,
            "--trainer.strategy",
            "callbacks.strategies.MistralDDPStrategy",
            "--trainer.strategy.find_unused_parameters",
            "maybe",
        ],
        "find_unused_parameters must be true or false, got 'maybe'",
    ),
    Case(
        "a strategy setting of the wrong type",
        [
            *FIT,
            "--trainer.strategy",
            "callbacks.strategies.MistralDDPStrategy",
            "--trainer.strategy.static_graph",
            "perhaps",
        ],
        "trainer.strategy.static_graph: expected true or false, got 'perhaps'",
    ),
    Case(
        "a run without a logger where an earlier one exported",
        [*FIT, "--trainer.logger", "false", "--trainer.default_root_dir", "{tmp}/no-logger-run"],
        "no-logger-run/export already exists: an earlier run of this log folder exported there; set another "
        "trainer.default_root_dir (the logger is off)",
    ),
    Case(
        "a pinned logger version whose earlier run exported",
        [*FIT, "--trainer.logger.init_args.version", "0"],
        "version_0/export already exists: an earlier run of this log folder exported there; set another "
        "trainer.logger's version",
    ),
    Case(
        "a static DDP graph with gradient accumulation",
        [
            *FIT,
            "--trainer.strategy",
            "callbacks.strategies.MistralDDPStrategy",
            "--trainer.strategy.static_graph",
            "true",
            "--trainer.accumulate_grad_batches",
            "2",
        ],
        "static_graph true cannot accumulate gradients",
    ),
    Case(
        "a static DDP graph with an accumulation schedule",
        [
            *FIT,
            *("--trainer.strategy", "callbacks.strategies.MistralDDPStrategy", "--trainer.strategy.static_graph"),
            *("true", "--trainer.callbacks+=GradientAccumulationScheduler", "--trainer.callbacks.scheduling"),
            "{0: 2}",
        ],
        "cannot accumulate gradients (a GradientAccumulationScheduler)",
    ),
    Case("a learning rate that is not a number", [*FIT, "--model.learning_rate", ".nan"], "learning_rate must be > 0"),
    Case(
        "a batch larger than the whole training split",
        [*FIT, "--data.batch_size", "100000"],
        "data.batch_size 100000 is more than the ",
    ),
    Case("no training step", [*FIT, "--trainer.max_steps", "0"], "trainer.max_steps 0 trains nothing"),
    Case("no training epoch", [*FIT, "--trainer.max_epochs", "0"], "trainer.max_epochs 0 trains nothing"),
    Case("no training batch", [*FIT, "--trainer.limit_train_batches", "0.0"], "trainer.limit_train_batches 0.0 trains"),
    Case(
        "no batch a step (gradient accumulation 0)",
        [*FIT, "--trainer.accumulate_grad_batches", "0"],
        "trainer.accumulate_grad_batches must be a whole number of at least 1, got 0",
    ),
    Case(
        "validation every 0 batches",
        [*FIT, "--trainer.val_check_interval", "0"],
        "trainer.val_check_interval must be a number of batches",
    ),
    Case(
        "a negative gradient clipping norm",
        [*FIT, "--trainer.gradient_clip_val", "-1"],
        "trainer.gradient_clip_val must be positive",
    ),
    Case(
        "more new tokens than the model has positions",
        [*PREDICT, "--model.generation.max_new_tokens", "100000"],
        "beyond the model's 2048",
    ),
    Case("a prompt longer than the model", [*PREDICT, "--data.prompts_file", "{tmp}/long.txt"], "prompt 1 has"),
    Case("a prompts file that does not exist", [*PREDICT, "--data.prompts_file", "{tmp}/none.txt"], "is not a file"),
    Case("a prompts file with a bad line", [*PREDICT, "--data.prompts_file", "{tmp}/bad.jsonl"], "bad.jsonl:2 is not"),
    Case("an empty prompts file", [*PREDICT, "--data.prompts_file", "{tmp}/blank.txt"], "holds no prompt"),
    Case(
        "predictions that would be overwritten",
        [
            *PREDICT,
            "--trainer.callbacks+=callbacks.JsonlPredictionWriter",
            "--trainer.callbacks.output_path",
            "{tmp}/kept.jsonl",
        ],
        "kept.jsonl already exists",
    ),
    Case(
        "a log folder that cannot be created",
        [*VALIDATE, "--trainer.logger.init_args.save_dir", "{tmp}/a_file/runs"],
        "cannot be created",
    ),
    Case("a checkpoint that does not exist", [*FIT, "--ckpt_path", "{tmp}/none.ckpt"], "none.ckpt' does not exist"),
    Case("a checkpoint that is a folder", [*FIT, "--ckpt_path", "{tmp}"], "is a folder"),
    Case("a truncated checkpoint", [*FIT, "--ckpt_path", "{tmp}/truncated.ckpt"], "is not a readable checkpoint"),
    Case("a checkpoint that is text", [*VALIDATE, "--ckpt_path", "{tmp}/text.ckpt"], "is not a readable checkpoint"),
    Case(
        "another model's checkpoint",
        [*FIT, "--ckpt_path", "{tmp}/three-layers.ckpt"],
        "does not fit the configured model: model.preset_overrides is {'num_hidden_layers': 3}",
    ),
    Case("a study with no variant", ["compare", "--variants", "[]"], "compare --variants is empty"),
    Case("a study with 0 new tokens", ["compare", "--new_tokens", "0"], "compare --new_tokens must be >= 1"),
    Case("exporting a missing checkpoint", ["export", "--ckpt_path", "{tmp}/none.ckpt"], "does not exist"),
    Case("exporting on a GPU there is not", ["export", "--ckpt_path", "x.ckpt", "--device", "cuda"], "no CUDA GPU"),
    Case("an unknown command", ["tune"], "unknown command 'tune'"),
    # your own data: each refused before weights load, naming the file and the line
    Case("an instruction set with no path", QA, "data.path is not set; give a file, a folder or a glob"),
    Case("an empty instruction file", [*QA, "--data.path", "{tmp}/empty.jsonl"], "empty.jsonl is empty"),
    Case("a JSONL line without the field", [*QA, "--data.path", "{tmp}/bad.jsonl"], "bad.jsonl:1 has no 'response'"),
    Case(
        "a column mapped to a missing field",
        [*QA, "--data.path", "{tmp}/qa.jsonl", "--data.columns", '{"prompt": "question"}'],
        "qa.jsonl:1 has no 'question' field",
    ),
    Case("roles out of order", [*QA, "--data.path", "{tmp}/roles.jsonl"], "roles.jsonl:1: message 1 has role 'user'"),
    Case(
        "a conversation ending with the user",
        [*QA, "--data.path", "{tmp}/no-answer.jsonl"],
        "no-answer.jsonl:2: the conversation ends without an assistant message",
    ),
    Case(
        "a response empty after templating",
        [*QA, "--data.path", "{tmp}/blank-answer.jsonl"],
        "blank-answer.jsonl:3: the response is empty once templated",
    ),
    Case(
        "every sample longer than the block",
        [*QA, "--data.path", "{tmp}/long.jsonl", "--data.block_size", "16"],
        "every sample of the train split of",
    ),
    Case(
        "a sample over the block with overlong: error",
        [*QA, "--data.path", "{tmp}/long.jsonl", "--data.block_size", "16", "--data.overlong", "error"],
        "renders to 61 tokens, more than data.block_size 16",
    ),
    Case("a non-UTF-8 instruction file", [*QA, "--data.path", "{tmp}/binary.jsonl"], "binary.jsonl:2 is not UTF-8"),
    Case(
        "an instruction set with nothing left to train on",
        [*QA, "--data.path", "{tmp}/qa.jsonl", "--data.val_fraction", "0.5", "--data.test_fraction", "0.5"],
        "data.val_fraction + data.test_fraction = 1 leaves nothing to train on",
    ),
    Case(
        "an instruction set too small to split",
        [*QA, "--data.path", "{tmp}/qa.jsonl"],
        "the instruction set's train split is empty (2 samples in",
    ),
    Case("an empty corpus file", [*CORPUS, "--data.path", "{tmp}/blank.txt"], "blank.txt is empty"),
    Case("a corpus of binary text", [*CORPUS, "--data.path", "{tmp}/binary.txt"], "binary.txt:1 is not UTF-8 text"),
    Case("a corpus row without text", [*CORPUS, "--data.path", "{tmp}/kept.jsonl"], "kept.jsonl:1 has no 'text'"),
    Case(
        "a corpus too small to hold anything out",
        [*CORPUS, "--data.path", "{tmp}/one.txt"],
        "the corpus's val split is empty",
    ),
    Case(
        "held-out files the corpus lacks",
        [*CORPUS, "--data.path", "{tmp}/corpus", "--data.val_files", "[nope.txt]"],
        "data.val_files ['nope.txt'] match no file of the corpus",
    ),
    Case("a corpus folder without text", [*CORPUS, "--data.path", "{tmp}/code"], "holds no .txt, .md"),
    Case("a study on text that is not there", ["compare", "--data", "{tmp}/nope"], "compare --data="),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, book_path) -> Path:
    """Files the cases point at, and a checkpoint of a 3-layer tiny model."""
    folder = tmp_path_factory.mktemp("bad-input")
    (folder / "empty.txt").write_text("")
    (folder / "binary.txt").write_bytes(b"\x00\xff\xfe" * 100)
    (folder / "broken.yaml").write_text("model: [unclosed\n")
    (folder / "loop-a.yaml").write_text("extends: loop-b.yaml\n")
    (folder / "loop-b.yaml").write_text("extends: loop-a.yaml\n")
    (folder / "long.txt").write_text("arr " * 3000 + "\n")
    (folder / "bad.jsonl").write_text('{"prompt": "Ahoy"}\n{"text": "no prompt"}\n')
    (folder / "blank.txt").write_text("\n\n")
    (folder / "kept.jsonl").write_text('{"keep": "me"}\n')
    (folder / "empty.jsonl").write_text("")
    (folder / "qa.jsonl").write_text('{"prompt": "Who?", "response": "Silver."}\n' * 2)
    turns = '{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}'
    (folder / "roles.jsonl").write_text('{"messages": [' + turns + "]}\n")
    (folder / "no-answer.jsonl").write_text(
        '{"prompt": "Who?", "response": "Silver."}\n{"messages": [{"role": "user", "content": "Who?"}]}\n'
    )
    (folder / "blank-answer.jsonl").write_text(
        '{"prompt": "Who?", "response": "Silver."}\n' * 2 + '{"prompt": "Hi", "response": "  "}\n'
    )
    (folder / "long.jsonl").write_text(('{"prompt": "' + "arr " * 50 + '", "response": "aye"}\n') * 10)
    (folder / "binary.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n\xff\xfe\n')
    (folder / "one.txt").write_text("Ahoy.")
    (folder / "code").mkdir()
    (folder / "code" / "train.py").write_text("print('not text data')\n")
    (folder / "corpus").mkdir()
    for index in range(4):
        (folder / "corpus" / f"doc{index}.txt").write_text(f"Document {index}: fifteen men on the dead man's chest.")
    (folder / "a_file").write_text("not a folder")
    (folder / "text.ckpt").write_text("not a checkpoint")
    (folder / "adapter").mkdir()  # an exported adapter's files, as far as settings are read before weights load
    (folder / "adapter" / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "base_model_name_or_path": "tiny", "r": 4, "lora_alpha": 8, '
        '"target_modules": ["q_proj", "v_proj"]}'
    )
    (folder / "adapter" / "smarter_export.json").write_text('{"base": {"preset": "tiny", "preset_seed": 0}}')
    (folder / "no-logger-run" / "export" / "model").mkdir(parents=True)  # an earlier run's export, no logger
    (folder / "no-logger-run" / "export" / "model" / "config.json").write_text("{}")
    import lightning as L

    from datamodules.treasure_island import TreasureIslandDataModule
    from lightning_modules import MistralModule

    module = MistralModule(source="tiny", dtype="float32", preset_overrides={"num_hidden_layers": 3})
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(folder / "fit"),
    )
    trainer.fit(module, datamodule=TreasureIslandDataModule(block_size=64, batch_size=2))
    trainer.save_checkpoint(folder / "three-layers.ckpt")
    (folder / "truncated.ckpt").write_bytes((folder / "three-layers.ckpt").read_bytes()[:5000])
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def run_case(case: Case, tmp: Path) -> tuple[int, str]:
    """(exit status, standard error) of ``smarter`` run in-process on ``case``."""
    args = [arg.replace("{tmp}", str(tmp)) for arg in case.args]
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
            code = 0
        except SystemExit as stop:
            code = int(stop.code or 0)
    return code, errors.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, scratch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny" / "version_0").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "version_0" / "config.yaml").write_text("an earlier run\n")
    (tmp_path / "runs" / "tiny" / "version_0" / "export" / "model").mkdir(parents=True)  # and its export
    before, scratch_before = _snapshot(tmp_path), _snapshot(scratch)
    code, stderr = run_case(case, scratch)
    errors = [line for line in stderr.splitlines() if line.startswith("smarter: error:")]
    assert code == 2, stderr[-2000:]
    assert len(errors) == 1 and case.expected in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert _snapshot(tmp_path) == before and _snapshot(scratch) == scratch_before  # a refusal changes no file
    SEEN[case.name] = errors[0].replace(str(scratch), "<folder>")


SEEN: dict[str, str] = {}


def _as_typed(args: list[str]) -> list[str]:
    """The arguments without the config and quiet settings every case shares (its values, like a 'false' of
    the case's own, kept)."""
    shared, typed, i = [["-c", TINY], QUIET], [], 0
    while i < len(args):
        prefix = next((p for p in shared if args[i : i + len(p)] == p), None)
        if prefix is not None:
            i += len(prefix)
            continue
        typed.append(args[i])
        i += 1
    return typed


def test_there_are_at_least_thirty_cases_and_the_docs_table_lists_each():
    assert len(CASES) >= 30
    docs = REPO_ROOT / "docs" / "bad_input.md"
    if os.environ.get("WRITE_BAD_INPUT_TABLE") and len(SEEN) == len(CASES):
        rows = []
        for case in CASES:
            typed = " ".join(_as_typed(case.args)).replace("{tmp}", "<folder>").replace(f"{REPO_ROOT}/", "")
            rows.append(f"| {case.name} | `smarter {typed}` | {SEEN[case.name]} |".replace("||", "| |"))
        header = docs.read_text().split("| bad input |")[0]
        docs.write_text(
            header + "| bad input | command (abridged) | message |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n"
        )
    table = docs.read_text()
    for case in CASES:
        assert f"| {case.name} |" in table, case.name
