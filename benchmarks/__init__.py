"""msgnet benchmarks: msgnet and its baselines measured side by side in one run."""
