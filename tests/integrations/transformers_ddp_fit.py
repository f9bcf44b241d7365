"""Train ``transformers_task``'s tiny GPT-2 with the TWA callback on the processes ``torchrun``
started (2 on CPU, gloo); each writes what it ends with to ``<out>/rank<r>.pt``.

    python -m torch.distributed.run --nproc_per_node=2 tests/integrations/transformers_ddp_fit.py OUT_DIR

Run by ``test_transformers_callback.test_ddp_...``.
"""
import sys
from pathlib import Path

import torch

import transformers_task as task
from twa_ray.integrations.transformers import TWACallback


def main(out: Path) -> None:
    callback = TWACallback(every_n_steps=2, twa_epochs=1, lr=0.5)
    trainer = task.make_trainer(out, callback)  # 3 epochs of 64 / (8 x 2 processes) = 4 steps
    trainer.train()
    torch.save({
        "state_dict": trainer.model.state_dict(), "raw_state_dict": callback.raw_state_dict,
        "coefficients": callback.coefficients, "shard": callback.shard.__dict__, "history": callback.history,
        "candidates": callback.candidate_indices, "store": callback.store_uri, "world_size": trainer.args.world_size,
        "batches_per_epoch": len(trainer.get_train_dataloader()),
    }, out / f"rank{trainer.args.process_index}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
