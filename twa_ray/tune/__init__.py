"""Ray Tune sweeps over TWA settings (``run_sweep``) and their search spaces."""
