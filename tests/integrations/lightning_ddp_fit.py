"""Fit ``lightning_task.TinyClassifier`` with ``strategy="ddp"`` on 2 CPU processes and the TWA
callback; each rank writes what it ends with to ``<out>/rank<r>.pt``.

    python tests/integrations/lightning_ddp_fit.py OUT_DIR

Lightning's DDP launcher starts rank 1 by running this same command line again (hence a
script, not a test function). Run by ``test_lightning_callback.test_ddp_...``.
"""
import sys
from pathlib import Path

import torch

import lightning_task as task
from twa_ray.integrations.lightning import TWACallback


def main(out: Path) -> None:
    data = task.points()
    model = task.TinyClassifier()
    callback = TWACallback(every_n_epochs=1, twa_epochs=2, lr=0.5)
    trainer = task.trainer(strategy="ddp", devices=2, max_epochs=3, callbacks=[callback], default_root_dir=str(out))
    trainer.fit(model, task.loader(data))
    torch.save({
        "state_dict": model.state_dict(), "raw_state_dict": callback.raw_state_dict,
        "coefficients": callback.coefficients, "shard": callback.shard.__dict__, "history": callback.history,
        "candidates": callback.candidate_indices, "store": callback.store_uri, "world_size": trainer.world_size,
        "batches_per_epoch": trainer.num_training_batches,
    }, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
