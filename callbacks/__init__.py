"""Callbacks: kernel tracing with torch.profiler, throughput, MFU and memory."""

from callbacks.kernel_trace import KernelTraceCallback
from callbacks.throughput import ThroughputMemoryCallback

__all__ = ["KernelTraceCallback", "ThroughputMemoryCallback"]
