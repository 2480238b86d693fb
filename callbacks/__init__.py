"""Callbacks: kernel tracing with torch.profiler, throughput, MFU and memory, predictions as JSON Lines,
and the per-stage base they share."""

from callbacks.kernel_trace import KernelTraceCallback
from callbacks.prediction_writer import JsonlPredictionWriter
from callbacks.stage_hooks import StageCallback
from callbacks.throughput import ThroughputMemoryCallback

__all__ = ["JsonlPredictionWriter", "KernelTraceCallback", "StageCallback", "ThroughputMemoryCallback"]
