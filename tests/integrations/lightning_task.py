"""A tiny Lightning task shared by the callback tests and the DDP script they run: an MLP
with a BatchNorm classifying synthetic 6-dimensional points into 3 classes."""
from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(L.LightningModule):
    """Linear(6, 16), BatchNorm1d, ReLU, Linear(16, 3); SGD; ``training_step`` logs and
    returns {"loss": ...} as many users' modules do."""

    def __init__(self, lr: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def points(n: int = 256, seed: int = 0) -> TensorDataset:
    """n points labelled by a random two-layer teacher (not linearly separable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    teacher = torch.tanh(x @ torch.randn(6, 8, generator=g)) @ torch.randn(8, 3, generator=g)
    return TensorDataset(x, teacher.argmax(1))


def loader(data: TensorDataset, batch_size: int = 32, shuffle: bool = True) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(1))


def trainer(**kwargs) -> L.Trainer:
    """A quiet CPU trainer (no logger, checkpoints or progress bar unless given)."""
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**settings, **kwargs})


@torch.no_grad()
def mean_loss(model: nn.Module, data: TensorDataset) -> float:
    """Cross-entropy of ``model`` in eval mode on all of ``data``."""
    was_training = model.training
    model.eval()
    x, y = data.tensors
    loss = nn.functional.cross_entropy(model(x), y).item()
    model.train(was_training)
    return loss
