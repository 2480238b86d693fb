"""Callbacks: kernel tracing with torch.profiler, throughput, MFU and memory."""

from callbacks.kernel_trace import KernelTraceCallback
from callbacks.prediction_writer import JsonlPredictionWriter
from callbacks.throughput import ThroughputMemoryCallback

__all__ = ["JsonlPredictionWriter", "KernelTraceCallback", "ThroughputMemoryCallback"]
