"""Step diagnostics for GPU training runs (trainer add-ons for investigations, not for everyday runs).

- ``MemorySnapshotStep``: records the CUDA allocator's history over one training batch (first process)
  and prints what is alive at that batch's peak, grouped by allocation site (Python stack), and the
  gradient each FSDP flat parameter holds; with ``save_path`` the raw snapshot is kept (gzipped pickle);
- ``PhaseTimer``: synchronized milliseconds per step of forward, backward, the optimizer and the time
  between batches (first process), from the fifth batch on;
- ``GpuPhaseTimer``: the same phases timed on the GPU by CUDA events, on every process, without
  synchronizing during training.

    smarter fit ... --trainer.callbacks+=benchmarks.step_diagnostics.MemorySnapshotStep
"""

import collections
import gzip
import itertools
import json
import os
import pickle
import time

import lightning as L
import torch

from foundation import ConfigError

SKIP = (
    "torch/nn/modules/module.py",
    "torch/utils/_contextlib.py",
    "<frozen",
    "torch/_dynamo/eval_frame.py",
    "torch/autograd/function.py",
    "torch/utils/checkpoint.py",
    "torch/_compile.py",
    "torch/_ops.py",
    "torch/_library",
    "torch/_tensor.py",
    "functools.py",
)


def site(frames, depth=5):
    kept = []
    for f in frames:
        name = f.get("filename", "")
        if any(s in name for s in SKIP):
            continue
        short = "/".join(name.split("/")[-2:])
        kept.append(f"{short}:{f.get('line')}:{f.get('name')}")
        if len(kept) == depth:
            break
    return " < ".join(kept) if kept else "<no python frame: backward/C++>"


def analyze(snapshot, baseline, device=0, top=25):
    events = snapshot["device_traces"][device]
    cur, peak, peak_i = 0, 0, -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            cur += e["size"]
        elif e["action"] == "free_requested":
            cur -= e["size"]
        if cur > peak:
            peak, peak_i = cur, i
    live = {}
    freed_pre = 0
    for e in events[: peak_i + 1]:
        a = e["action"]
        if a == "alloc":
            live[e["addr"]] = e
        elif a == "free_requested" and live.pop(e["addr"], None) is None:
            freed_pre += e["size"]
    groups = collections.defaultdict(lambda: [0, 0])
    for e in live.values():
        g = groups[site(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    gib = 2**30
    lines = [
        f"[snap] baseline {baseline / gib:.2f} GiB; peak {(baseline + peak) / gib:.2f} GiB at event {peak_i}/"
        f"{len(events)}; pre-existing freed before peak {freed_pre / gib:.2f} GiB; "
        f"allocated in step and live at peak {sum(e['size'] for e in live.values()) / gib:.2f} GiB"
    ]
    for key, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"[snap] {size / gib:7.3f} GiB {count:5d}x  {key}")
    return "\n".join(lines)


class MemorySnapshotStep(L.Callback):
    """Records the allocator's history over training batch ``batch_idx`` (rank 0) and prints what is live at
    that batch's peak, grouped by allocation site; the snapshot itself goes to ``save_path`` if given."""

    def __init__(self, batch_idx: int = 1, save_path: str | None = None):
        self.batch_idx = batch_idx
        self.save_path = save_path
        self.baseline = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx and trainer.global_rank == 0 and torch.cuda.is_available():
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx and trainer.global_rank == 0 and torch.cuda.is_available():
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"[snap] max_memory_allocated in batch {peak:.2f} GiB", flush=True)
            print(analyze(snapshot, self.baseline), flush=True)
            if self.save_path:
                with gzip.open(self.save_path, "wb") as f:
                    pickle.dump({"snapshot": snapshot, "baseline": self.baseline}, f)
            self._flat_params(trainer)

    @staticmethod
    def _flat_params(trainer):
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        except ImportError:
            return
        total = 0
        for m in FSDP.fsdp_modules(trainer.strategy.model):
            handle = getattr(m, "_handle", None)
            if handle is None:
                continue
            fp = handle.flat_param
            g = fp.grad
            size = 0 if g is None else g.numel() * g.element_size()
            saved = getattr(fp, "_saved_grad_shard", None)
            ssize = 0 if saved is None else saved.numel() * saved.element_size()
            total += size + ssize
            if size + ssize > 2**20:
                print(
                    f"[flat] {type(m._fsdp_wrapped_module).__name__} numel={fp.numel()} rg={fp.requires_grad} "
                    f"grad={size} saved_shard={ssize}",
                    flush=True,
                )
        print(f"[flat] total flat-param grad bytes {total / 2**30:.3f} GiB", flush=True)


class PhaseTimer(L.Callback):
    """Synchronized time of forward, backward, optimizer and between-batch phases (rank 0), from batch 4 on."""

    def __init__(self):
        self.t = None
        self.sums = collections.defaultdict(float)
        self.n = 0
        self.active = False

    def _mark(self, phase):
        torch.cuda.synchronize()
        now = time.perf_counter()
        if self.t is not None and self.active:
            self.sums[phase] += now - self.t
        self.t = now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = batch_idx >= 4
        self.n += self.active
        self._mark("between")

    def on_before_backward(self, trainer, pl_module, loss):
        self._mark("forward")

    def on_after_backward(self, trainer, pl_module):
        self._mark("backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._mark("after_backward_to_opt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mark("optimizer_and_end")

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0 and self.n:
            print(
                "[phase] rank0 ms/step: " + ", ".join(f"{k} {1000 * v / self.n:.1f}" for k, v in self.sums.items()),
                flush=True,
            )


class GpuPhaseTimer(L.Callback):
    """GPU time of each phase of a training step, on every process, without synchronizing anything
    during training (unlike ``PhaseTimer``): CUDA events recorded on the compute stream at the phase
    boundaries, read once training ends. A phase that grows under DDP against one GPU's is where the
    GPU waited (in the forward, for the token count's all-reduce; in the backward, for gradient
    buckets; before the optimizer, for the last bucket). Prints one ``[gpu-phase]`` line per process.

    The forward is split where the decoder stack returns (``layers``, then ``loss``: the LM head, the
    loss and, under DDP, the token count's all-reduce), when the module has one.

    The host's clock is read at the same boundaries (a ``[host-phase]`` line, on CPUs too): the time the
    host took to queue each phase. Where the host's forward takes as long as the GPU's, the GPU waited for
    kernels to be queued (the host sets the pace), not for the other process.

    With ``dump_dir``, each process also writes every timed step (host clock at each boundary, which
    processes of one machine share, and GPU milliseconds per phase) to ``phases-rank<N>.json`` there:
    which process waited for which, step by step.

        smarter fit ... --trainer.callbacks+=benchmarks.step_diagnostics.GpuPhaseTimer
    """

    PHASES = ("between", "forward", "backward", "to_optimizer", "optimizer_and_end")
    SPLIT_PHASES = ("between", "layers", "loss", "backward", "to_optimizer", "optimizer_and_end")

    def __init__(self, skip: int = 4, dump_dir: str | None = None):
        if dump_dir is not None and os.path.exists(dump_dir) and not os.path.isdir(dump_dir):
            raise ConfigError(f"GpuPhaseTimer: dump_dir {dump_dir} is a file; give a folder (made if missing).")
        self.skip = skip
        self.dump_dir = dump_dir
        self.phases = self.PHASES
        self.steps: list[list[torch.cuda.Event]] = []
        self.current: list[torch.cuda.Event] | None = None
        self.host_steps: list[list[float]] = []
        self.host_current: list[float] | None = None
        self._hook = None

    def on_train_start(self, trainer, pl_module):
        causal_lm = getattr(pl_module, "_causal_lm", None)
        decoder = getattr(causal_lm(), "model", None) if causal_lm is not None else None
        if isinstance(decoder, torch.nn.Module) and self._hook is None:
            self._hook = decoder.register_forward_hook(self._after_decoder)
            self.phases = self.SPLIT_PHASES

    def _after_decoder(self, module, args, output):
        if self.host_current is not None and len(self.host_current) == 1:  # once a step, in training
            self._record()

    def _record(self) -> None:
        if self.host_current is not None:
            self.host_current.append(time.perf_counter() * 1000)
        if self.current is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.current.append(event)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        timed = batch_idx >= self.skip
        self.host_current = [] if timed else None
        self.current = [] if timed and torch.cuda.is_available() else None
        if timed:
            self.host_steps.append(self.host_current)
        if self.current is not None:
            self.steps.append(self.current)
        self._record()

    def on_before_backward(self, trainer, pl_module, loss):
        self._record()

    def on_after_backward(self, trainer, pl_module):
        self._record()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._record()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record()

    def phase_line(self, steps: list[list], elapsed) -> str | None:
        """Mean milliseconds a step of each phase (``elapsed(a, b)``: from boundary a to b), and the spread
        of whole steps; None without a complete step."""
        steps = [s for s in steps if len(s) == len(self.phases)]
        if not steps:
            return None
        sums = collections.defaultdict(float)
        totals = []  # each step's first to last boundary: the spread shows waits that come and go
        for previous, step in zip([None, *steps[:-1]], steps, strict=True):
            totals.append(elapsed(step[0], step[-1]))
            if previous is not None:
                sums["between"] += elapsed(previous[-1], step[0])
            for name, (start, end) in zip(self.phases[1:], itertools.pairwise(step), strict=True):
                sums[name] += elapsed(start, end)
        sums["between"] /= max(1, len(steps) - 1)
        for name in self.phases[1:]:
            sums[name] /= len(steps)
        total = sum(sums.values())
        return (
            f"ms/step over {len(steps)} steps: "
            + ", ".join(f"{name} {sums[name]:.1f}" for name in self.phases)
            + f", total {total:.1f}; step min {min(totals):.1f} median {sorted(totals)[len(totals) // 2]:.1f}"
            + f" max {max(totals):.1f}"
        )

    def on_train_end(self, trainer, pl_module):
        rank = trainer.global_rank
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        host = self.phase_line(self.host_steps, lambda start, end: end - start)
        if host is not None:
            print(f"[host-phase] rank {rank} {host}", flush=True)
        gpu_ms: list[list[float]] = []
        if self.steps:
            torch.cuda.synchronize()
            gpu = self.phase_line(self.steps, lambda start, end: start.elapsed_time(end))
            if gpu is not None:
                print(f"[gpu-phase] rank {rank} {gpu}", flush=True)
            gpu_ms = [[a.elapsed_time(b) for a, b in itertools.pairwise(s)] for s in self.steps]
        if self.dump_dir is not None:
            os.makedirs(self.dump_dir, exist_ok=True)
            record = {"rank": rank, "phases": self.phases, "host_ms": self.host_steps, "gpu_phase_ms": gpu_ms}
            with open(os.path.join(self.dump_dir, f"phases-rank{rank}.json"), "w") as out:
                json.dump(record, out)
