"""The build core: pipeline configuration, per-item stages, executors, shard writing, the engine."""
