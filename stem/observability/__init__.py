"""Signals, events, metrics, tracing and structured logs."""
