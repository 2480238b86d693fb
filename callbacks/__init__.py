"""Callbacks: kernel tracing, throughput and memory."""
