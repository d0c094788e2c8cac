"""Training: the run config, objective, loop, batched probes, schedules, interpolation, evaluation and the run session."""
