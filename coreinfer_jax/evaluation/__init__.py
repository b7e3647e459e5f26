"""Quality: evaluation data, metrics, task prompts, eval, sweeps, the lm-evaluation-harness adapter."""
