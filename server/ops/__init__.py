"""Operations, shared by every layer: metrics, GPU memory gauges, logs, the audit log, request context and
timings, and the allocator chosen at start. Nothing here imports the layers above it."""
