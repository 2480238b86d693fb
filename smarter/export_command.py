"""``smarter export``: a checkpoint's trained model as Hugging Face folders, usable without this framework."""

from __future__ import annotations

from pathlib import Path

import torch

from foundation import ConfigError, check_writable_folder, notify

DESCRIPTION = """Write the model a checkpoint holds as Hugging Face folders: adapter/ (a PEFT adapter, for
PeftModel.from_pretrained on its base) and merged/ (the adapter merged into its base, dequantized first if
the base is quantized, for AutoModelForCausalLM.from_pretrained alone), or model/ for a full fine-tune.
Each folder holds the tokenizer and smarter_export.json, and is a valid model.source."""


def default_output_dir(ckpt_path: Path) -> Path:
    """``runs/<name>/version_N/export-<checkpoint stem>`` for ``runs/<name>/version_N/checkpoints/<stem>.ckpt``."""
    run_folder = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    return run_folder / f"export-{ckpt_path.stem}"


def export_main(args: list[str]) -> None:
    from jsonargparse import ArgumentParser

    from lightning_modules.export import export_trained_model
    from lightning_modules.mistral_module import load_trained
    from smarter.errors import condense_parser_error, fail

    class ExportParser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            fail(f"{condense_parser_error(message)} (see `smarter export --help`)")

    parser = ExportParser(prog="smarter export", description=DESCRIPTION)
    parser.add_argument("--ckpt_path", type=str, required=True, help="The checkpoint (.ckpt) to export.")
    parser.add_argument(
        "--output_dir", type=str | None, default=None, help="Folder to write; unset: export-<stem> in the run folder."
    )
    parser.add_argument("--merged", type=bool, default=True, help="With an adapter, also write it merged.")
    parser.add_argument("--device", type=str, default="auto", help="Where to build the model: auto, cpu or cuda.")
    parsed = parser.parse_args(args)
    if parsed.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device={parsed.device!r}; choose auto, cpu or cuda.")
    if parsed.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA GPU is visible; use --device cpu.")
    device = parsed.device if parsed.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt_path = Path(parsed.ckpt_path).expanduser()
    output = Path(parsed.output_dir).expanduser() if parsed.output_dir else default_output_dir(ckpt_path)
    if output.exists():
        raise ConfigError(
            f"{output} already exists; choose another --output_dir or move it away (nothing was written)."
        )

    check_writable_folder(output, "--output_dir")
    module = load_trained(str(ckpt_path), device, what="--ckpt_path")
    written = export_trained_model(module.model, module.spec, output, merged=parsed.merged, checkpoint=str(ckpt_path))
    notify(f"exported {ckpt_path} to {', '.join(str(p) for p in written)}")
    for path in written:
        print(path)
