"""Training speed on your own data against the book, at the same tokens per step: each workload is a
``smarter fit`` of one recipe as shipped (``qlora-fast`` by default) with the throughput callback, run one after
another on the same GPU, and read back from its TensorBoard log.

Workloads (4 x 1024 tokens a step with the 7B base config):
- ``book``: Treasure Island, the default data;
- ``instructions``: the instruction set made from the book (``datamodules.book_instructions``), packed, trained on
  the answers only;
- ``instructions-within``: the same, each sample attending only to itself (position ids restart per sample).

Printed side by side: the step time, every position computed per second (``input tok/s``: the same compute),
the positions that hold a sample rather than padding (``real tok/s``), the scored tokens per second (the
answers only, for instructions), MFU and peak memory; the ratio column is each workload's real tokens/s over
the book's.

    python benchmarks/own_data_speed.py --steps 30 --out own-data-speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from command_runs import Job, make_user_folder, run_job  # noqa: E402

QUESTIONS = "data/book-qa.jsonl"
WORKLOADS = {
    "book": "",
    "instructions": f"-c configs/data/instructions.yaml --data.path {QUESTIONS}",
    "instructions-within": (
        f"-c configs/data/instructions.yaml --data.path {QUESTIONS} --data.attend_within_samples true"
    ),
}


def real_share(folder: Path, workload: str, block_size: int) -> float:
    """The share of the training rows' positions that hold a sample's token (not padding)."""
    import torch

    from datamodules import InstructionDataModule, TreasureIslandDataModule

    if workload == "book":
        data = TreasureIslandDataModule(block_size=block_size)
        data.setup("fit")
        rows = data.datasets["train"].tensors
        return float((rows["labels"] != -100).sum()) / rows["labels"].numel()
    data = InstructionDataModule(path=str(folder / QUESTIONS), block_size=block_size)
    data.setup("fit")
    rows = data.datasets["train"].tensors
    real = sum(len(data.render(sample).ids) - 1 for sample in data.load_source()["train"])
    return min(1.0, real / rows["input_ids"].numel()) if isinstance(rows["input_ids"], torch.Tensor) else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="qlora-fast", help="a config of configs/finetune/")
    parser.add_argument("--steps", type=int, default=30, help="training steps a workload (the first 2 untimed)")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers of the 7B shape (0: all 32)")
    parser.add_argument("--folder", default="own-data-runs", help="where the runs are written")
    parser.add_argument("--only", nargs="*", default=list(WORKLOADS), help="workloads to run")
    parser.add_argument("--out", default=None, help="a JSON file of the figures")
    args = parser.parse_args(argv)

    from datamodules.book_instructions import main as make_book_questions
    from helpers import scalars

    folder = make_user_folder(Path(args.folder).resolve())
    if not (folder / QUESTIONS).is_file():
        make_book_questions(["--output", str(folder / QUESTIONS)])
    shape = f"--model.preset_overrides '{{num_hidden_layers: {args.layers}}}'" if args.layers else ""
    rows = {}
    for name in args.only:
        command = (
            f"smarter fit -c configs/finetune/{args.recipe}.yaml -c configs/callbacks/throughput.yaml "
            f"{WORKLOADS[name]} {shape} --trainer.max_steps {args.steps} --trainer.max_epochs 1000 "
            "--trainer.limit_val_batches 0 --trainer.num_sanity_val_steps 0 "
            f"--trainer.logger.init_args.version {name}"
        )
        ran = run_job(Job(name, command, folder, timeout=1200))
        if ran.returncode != 0:
            rows[name] = {"status": "failed", "error": ran.stderr.strip().splitlines()[-1:]}
            print(f"[own-data] {name}: FAILED {rows[name]['error']}", flush=True)
            continue
        logged = scalars(folder / "runs" / args.recipe / name)
        last = {tag: values[-1][1] for tag, values in logged.items()}
        share = real_share(folder, name, 1024)
        rows[name] = {
            "status": "ok",
            "step_ms": last["perf/train/step_time_ms"],
            "input_tokens_per_s": last["perf/train/input_tokens_per_s"],
            "real_tokens_per_s": last["perf/train/input_tokens_per_s"] * share,
            "scored_tokens_per_s": last["perf/train/tokens_per_s"],
            "real_share": share,
            "mfu": last.get("perf/train/mfu"),
            "peak_allocated_gib": last.get("perf/train/peak_allocated_gib"),
            "seconds": ran.seconds,
        }
        print(f"[own-data] {name}: {json.dumps(rows[name])}", flush=True)
    book = rows.get("book", {}).get("real_tokens_per_s")
    print(f"\n{args.recipe}, {args.steps} steps each ({args.layers or 32} layers)")
    print("| data | step ms | input tok/s | real tok/s | scored tok/s | padding | MFU | peak GiB | real vs book |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        if row["status"] != "ok":
            print(f"| {name} | failed: {row['error']} |")
            continue
        ratio = f"{row['real_tokens_per_s'] / book:.3f}x" if book else "-"
        mfu = f"{row['mfu']:.3f}" if row["mfu"] else "-"
        print(
            f"| {name} | {row['step_ms']:.1f} | {row['input_tokens_per_s']:,.0f} | {row['real_tokens_per_s']:,.0f} | "
            f"{row['scored_tokens_per_s']:,.0f} | {1 - row['real_share']:.1%} | {mfu} | "
            f"{row['peak_allocated_gib'] or 0:.2f} | {ratio} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"recipe": args.recipe, "steps": args.steps, "rows": rows}, indent=2))
    return 0 if all(row["status"] == "ok" for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
