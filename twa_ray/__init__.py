"""twa_ray: Trainable Weight Averaging (TWA) on Ray."""
