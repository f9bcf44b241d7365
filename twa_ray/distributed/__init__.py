"""Ray Train layers: base training (data parallel) and sharded TWA (column shards)."""
