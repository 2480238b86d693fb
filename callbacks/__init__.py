"""Trainer add-ons: kernel tracing with torch.profiler, throughput, MFU and memory, predictions as JSON
Lines, export at the end of fit, a clean stop on SIGTERM / SIGINT, atomic checkpoint files, and the
per-stage base they share."""

from callbacks.checkpoint_io import AtomicCheckpointIO
from callbacks.interruption import StopOnSignal
from callbacks.kernel_trace import KernelTraceCallback
from callbacks.model_export import ExportAtFitEnd
from callbacks.prediction_writer import JsonlPredictionWriter
from callbacks.stage_hooks import StageCallback
from callbacks.throughput import ThroughputMemoryCallback

__all__ = [
    "AtomicCheckpointIO",
    "ExportAtFitEnd",
    "JsonlPredictionWriter",
    "KernelTraceCallback",
    "StageCallback",
    "StopOnSignal",
    "ThroughputMemoryCallback",
]
