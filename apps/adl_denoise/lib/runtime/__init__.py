"""Process and machine concerns shared by the science, the app and the benchmarks: atomic file writes, time
stamps, the machine description, CPU memory settings, mixed precision, NNPACK convolutions and the environment
switches of those settings."""
