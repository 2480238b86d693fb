"""Benchmark: what the kernel tracing callback costs per step outside its active window.

Runs the same validation loop with and without ``KernelTraceCallback`` (window on the first batches),
alternating the two several times on one loaded model, and compares the median step time of the
batches after the profiler window. Prints both side by side with the relative overhead.

    python benchmarks/trace_overhead.py -c configs/variants/bf16-sdpa.yaml      # GPU, 7B shape
    python benchmarks/trace_overhead.py -c configs/tiny.yaml --rounds 2           # CPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch

from callbacks import KernelTraceCallback, StageCallback
from foundation import synchronize
from smarter.lightning_cli import HEADLESS_TRAINER_ARGS, build_cli, quiet_known_warnings


class StepTimer(StageCallback):
    """Wall time of each validation batch, GPU synchronized."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_stage_batch_start(self, stage, trainer, pl_module, batch) -> None:
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_stage_batch_end(self, stage, trainer, pl_module, outputs, batch) -> None:
        synchronize(pl_module.device)
        self.times.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--rounds", type=int, default=3, help="alternating with/without rounds")
    parser.add_argument("--batches", type=int, default=30, help="validation batches per round")
    args, overrides = parser.parse_known_args()  # the rest are CLI overrides, e.g. --model.source tiny
    args.overrides = overrides
    quiet_known_warnings()
    # many held-out chapters, so a round has enough batches
    chapters = "[" + ",".join(str(n) for n in range(1, 21)) + "]"
    cli = build_cli(
        ["-c", args.config, "--data.val_chapters", chapters, *HEADLESS_TRAINER_ARGS, *args.overrides],
        run=False,
    )
    module, datamodule = cli.model, cli.datamodule
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.model = module.build_model(device).eval()
    window = 0 + 1 + 3  # the traced window below: wait 0, warm-up 1, active 3
    results: dict[str, list[float]] = {"without tracing": [], "with tracing": []}
    trace_root = tempfile.mkdtemp(prefix="trace_overhead-")
    for round_index in range(args.rounds):
        for label in ("without tracing", "with tracing"):
            timer = StepTimer()
            callbacks = [timer]
            if label == "with tracing":
                callbacks.append(
                    KernelTraceCallback(
                        wait=0,
                        warmup=1,
                        active=3,
                        stages=["val"],
                        output_dir=f"{trace_root}/round{round_index}",
                    )
                )
            trainer = L.Trainer(
                accelerator="auto",
                devices=1,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=args.batches,
                callbacks=callbacks,
            )
            trainer.validate(module, datamodule=datamodule, verbose=False)
            # steps after the profiler window (and after the same warm-up batches in the baseline)
            results[label].extend(timer.times[window + 1 :])
    base = statistics.median(results["without tracing"])
    traced = statistics.median(results["with tracing"])
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\nconfig {args.config} {' '.join(args.overrides)} on {device_name}, torch {torch.__version__}")
    print(f"median step time over {len(results['without tracing'])} steps outside the profiler window:")
    print(f"{'without tracing':>18}: {1000 * base:9.3f} ms")
    print(f"{'with tracing':>18}: {1000 * traced:9.3f} ms")
    print(f"{'overhead':>18}: {100 * (traced / base - 1):+8.2f} %  (target: at most +3 %)")


if __name__ == "__main__":
    main()
