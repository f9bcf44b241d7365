"""A tiny Hugging Face task shared by the callback tests and the DDP script they run: a one-layer
GPT-2 (built from a config, no download) on synthetic token sequences."""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

SEQ_LEN = 16


class Tokens(torch.utils.data.Dataset):
    """Sequences counting up in steps of 3 (mod 64) from a random token: a pattern one layer learns."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, 64, (n, 1), generator=g)
        self.ids = (starts + 3 * torch.arange(SEQ_LEN)) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def make_trainer(tmp_path, callback, epochs=3, callbacks=(), **arguments) -> Trainer:
    """A Trainer of ``tiny_gpt2`` with ``callback`` (then ``callbacks``); ``arguments`` override
    its TrainingArguments (e.g. a save_strategy)."""
    args = TrainingArguments(**{
        "output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": [], "save_strategy": "no",
        "num_train_epochs": epochs, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
        "learning_rate": 1e-2, "logging_strategy": "no", "disable_tqdm": True, "seed": 0,
        "dataloader_num_workers": 0, **arguments})
    return Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(64, seed=0), eval_dataset=Tokens(32, seed=1),
                   callbacks=[callback, *callbacks])


@torch.no_grad()
def eval_loss(model, data) -> float:
    """The model's own mean loss over ``data``, in batches of 16 (as Trainer.evaluate batches it)."""
    model.eval()
    losses = [model(input_ids=data.ids[i:i + 16], labels=data.ids[i:i + 16]).loss for i in range(0, len(data), 16)]
    return float(torch.stack(losses).mean())
