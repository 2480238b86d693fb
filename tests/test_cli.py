"""The ``smarter`` command: every shipped config, subclasses, TensorBoard output, bad input."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO_ROOT
from helpers import QUIET, TINY, error_lines, run_smarter, scalars
from lightning_modules import MistralModule
from smarter.cli import COMMANDS, main
from smarter.config_files import expand_config_arguments, run_name
from smarter.errors import condense_parser_error
from smarter.lightning_cli import build_cli

CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
VARIANTS = sorted((REPO_ROOT / "configs" / "variants").glob("*.yaml"))
SNIPPET_FOLDERS = ("callbacks", "base")  # added on top of a main config, or extended by one


def test_the_shipped_configs_are_the_expected_ones():
    names = {str(p.relative_to(REPO_ROOT / "configs")) for p in CONFIGS}
    expected_variants = {f"variants/{q}-{a}.yaml" for q in ("bf16", "int8", "nf4") for a in ("eager", "sdpa")}
    assert expected_variants | {"tiny.yaml", "finetune/qlora.yaml", "finetune/lora.yaml"} <= names


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.stem)
def test_variant_files_are_short_and_resolve_to_their_own_model(variant):
    content = yaml.safe_load(variant.read_text())
    assert content["extends"] == "../base/mistral-7b.yaml"
    assert len([line for line in variant.read_text().splitlines() if not line.startswith("#")]) <= 8
    cli = build_cli(["-c", str(variant)], run=False)
    quantization, attention = variant.stem.split("-")
    spec = cli.model.spec
    assert (spec.source, spec.attention) == ("mistral-7b", attention)
    assert spec.quantization == {"bf16": "none", "int8": "int8", "nf4": "nf4"}[quantization]
    assert spec.dtype == ("float16" if quantization == "int8" else "bfloat16")
    data = cli.datamodule
    assert (data.block_size, data.eval_stride, data.batch_size, data.eval_batch_size) == (1024, 512, 4, 4)
    assert cli.trainer.logger.name == variant.stem  # the run is named after the variant file


def test_extends_expands_bases_first_and_refuses_cycles_and_missing_bases(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  source: tiny\n  learning_rate: 0.5\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nmodel:\n  learning_rate: 0.25\n")
    args = expand_config_arguments(["fit", "-c", str(child), "--model.warmup_steps", "3"])
    assert args[:3] == ["fit", "-c", str(base.resolve())]
    assert yaml.safe_load(args[4]) == {"model": {"learning_rate": 0.25}} and args[5:] == ["--model.warmup_steps", "3"]
    assert run_name(["fit", "-c", str(child)]) == "child"
    cli = build_cli(["-c", str(child)], run=False)
    assert cli.model.hparams.learning_rate == 0.25 and cli.model.spec.source == "tiny"
    base.write_text("extends: child.yaml\n")
    with pytest.raises(Exception, match="cycle"):
        expand_config_arguments(["-c", str(child)])
    child.write_text("extends: missing.yaml\n")
    with pytest.raises(Exception, match="extends missing.yaml, which is not a file"):
        expand_config_arguments(["-c", str(child)])


def test_help_lists_every_command_and_each_has_its_own_help(tmp_path, capsys):
    listed = run_smarter("--help", cwd=tmp_path)  # the command itself
    assert listed.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in listed.stdout
    assert {"fit", "validate", "test", "predict", "compare", "export"} <= set(COMMANDS)
    with pytest.raises(SystemExit) as compare_help:  # its entry point, in this process
        main(["compare", "--help"])
    assert compare_help.value.code == 0 and "--variants" in capsys.readouterr().out
    with pytest.raises(SystemExit) as unknown:
        main(["comapre"])
    assert unknown.value.code == 2
    assert error_lines(capsys.readouterr().err) == [
        "smarter: error: unknown command 'comapre'; choose one of fit, validate, test, predict, compare, export "
        "(see `smarter --help`)"
    ]


def test_parser_errors_are_condensed_to_the_key_and_the_reason():
    nested = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [...]\n'
        "  Errors:\n    - Problem with given class_path 'lightning_modules.MistralModule':\n"
        '        Parser key "quantization":\n'
        "          Expected a typing.Literal['none', 'int8', 'nf4', 'nf4-dq']. Got value: nf5\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'NestedArg'>\n  Given value: x"
    )
    assert condense_parser_error(nested) == ("model.quantization: 'nf5' is not one of 'none', 'int8', 'nf4', 'nf4-dq'")
    assert condense_parser_error("Parser key \"config\": File does not exist: '/x.yaml'") == (
        "config: File does not exist: '/x.yaml'"
    )
    # a union whose class was found: that class's error, not the plain-string alternative's
    strategy = (
        'Parser key "trainer.strategy":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [<class 'str'>, <class 'lightning.pytorch.strategies.strategy.Strategy'>]\n  Errors:\n"
        "    - Expected a <class 'str'>\n"
        "    - Problem with given class_path 'callbacks.strategies.MistralDDPStrategy':\n"
        '        Parser key "static_graph":\n'
        "          Expected a <class 'bool'>. Got value: perhaps\n"
        "  Given value type: <class 'jsonargparse._util.NestedArg'>\n"
        "  Given value: NestedArg(key='static_graph', val='perhaps')"
    )
    assert condense_parser_error(strategy) == "trainer.strategy.static_graph: expected true or false, got 'perhaps'"
    assert condense_parser_error("Parser key \"trainer.max_steps\":\n  Expected a <class 'int'>. Got value: ten") == (
        "trainer.max_steps: expected a whole number, got 'ten'"
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_every_config_parses_and_instantiates(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    is_snippet = config.parent.name in ("callbacks", "distributed")  # added on top of a main config
    args = ["-c", TINY] if is_snippet else []
    if config.parent.name == "distributed":  # GPU strategies: composed and parsed here, run on GPUs
        with pytest.raises(SystemExit) as printed:
            build_cli(["fit", *args, "-c", str(config), "--print_config"], run=True)
        assert printed.value.code == 0 and "strategy:" in capsys.readouterr().out
        return
    if "source: runs/" in config.read_text():  # it starts from an earlier run's export (tiny-instructions.yaml)
        cli = build_cli(["-c", str(config), "--model.source", "tiny"], run=False)
    else:
        cli = build_cli([*args, "-c", str(config)], run=False)
    if is_snippet:
        assert len(cli.trainer.callbacks) > len(build_cli(args, run=False).trainer.callbacks)
    assert isinstance(cli.model, MistralModule)
    assert cli.model.model is None  # weights load only in configure_model
    assert cli.datamodule.block_size <= cli.model.max_positions


def test_a_run_without_a_logger_trains_and_leaves_the_configs_learning_rate_monitor_out(
    tmp_path, book_path, capsys, monkeypatch
):
    """tiny.yaml has a LearningRateMonitor, which Lightning refuses without a logger at the start of training
    (a traceback before this was handled)."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", TINY, *QUIET, "--data.block_size", "64", "--trainer.max_steps", "2"]
    main([*args, "--trainer.limit_val_batches", "1", "--trainer.logger", "false"])
    assert "trainer.logger is off, so the learning-rate monitor of the config is left out." in capsys.readouterr().err
    assert (tmp_path / "export" / "model" / "model.safetensors").is_file()


def test_bad_choice_on_the_command_line_is_one_line_naming_the_choices(tmp_path):
    result = run_smarter("validate", "-c", TINY, "--model.quantization", "nf5", cwd=tmp_path)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "smarter: error: model.quantization: 'nf5' is not one of 'none', 'int8', 'nf4', 'nf4-dq' "
        "(see `smarter validate --help`)"
    ]
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--data.block_size", "4096"],
            "data.block_size=4096 exceeds the model's maximum positions (2048); lower data.block_size.",
        ),
        (["--data.batch_size", "0"], "data.batch_size must be >= 1, got 0."),
    ],
)
def test_errors_raised_while_the_cli_builds_objects_are_one_line(tmp_path, args, message):
    result = run_smarter("validate", "-c", TINY, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"smarter: error: {message}"]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_tiny_quick_start_learns_the_book_and_exports_it(trained_tiny):
    """The README's main job, as shipped: trains the tiny preset, cuts val perplexity, exports the model."""
    logged = scalars(trained_tiny)
    ppl = [value for _, value in logged["val/ppl"]]
    assert len(ppl) == 4
    assert ppl[-1] < 0.6 * ppl[0]
    assert ppl[-1] < 700  # beats a unigram model of the book (about 700)
    assert {"train/loss", "train/grad_norm", "val/loss", "val/bits_per_byte"} <= set(logged)
    assert list(trained_tiny.rglob("*.ckpt"))
    assert (trained_tiny / "export" / "model" / "model.safetensors").is_file()
