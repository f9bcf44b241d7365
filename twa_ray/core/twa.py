"""TWA: train the averaging coefficients X of saved candidates in a plain PyTorch loop.

    w(X)[B_l] = c[B_l] + sum_i X[i, l] * Q_il         X: (n, L), starts at X0
    dLoss/dX[i, l] = < Q_il , g[B_l] >                 g = dLoss/dw at w(X)

Both published algorithms (``twa_ray.core.subspace``):

- journal (bases ``normalized``, ``orthonormal``, ``orthonormal-global``): c is the SWA
  point and X0 = 0. Weight decay acts on X (toward the SWA point), as the optimizer's.
- ICLR'23 (basis ``checkpoints``): Q is an orthonormal basis of the raw candidates,
  X0 its coordinates of the start point (``projection.start``). Weight decay acts on the
  weights, toward 0: with SGD the coefficient gradient is

      G = Q (g + wd * w(X))          (the projection of g and of wd * w)

  and momentum runs on X. With b = 32 (Q orthonormal, c' outside its span) this is
  G = Q g + wd * X: the paper's update of w = Q^T X, momentum included. AdamW keeps its
  decoupled decay X <- (1 - lr * wd) X, the same shrinking of w projected on the span.

One ``step()`` after ``loss.backward()``:

1. g = the model's gradient (D,)
2. reduce-scatter g                          -> global gradient on this rank's range
3. G_r = Q[:, S_r] g[S_r]                    -> all-reduce (n x L numbers)
4. optimizer step on X (identical on every rank)
5. w[S_r] = c[S_r] + Q[:, S_r]^T X           -> all-gather -> model parameters

With one process the collectives are identities (``LocalCollectives``).

Which coordinates a rank owns, and how steps 1-2 and 5 reach the model, is the ``shard``'s
business (``ParamShard``): by default every rank holds the whole model and owns a range of
whole blocks (``ReplicatedShard``: steps 2 and 5 are the collectives above). Under FSDP2 a
rank holds its dim-0 rows of every tensor, and FSDP's own reduce-scatter and all-gather
are steps 2 and 5 (``twa_ray.parallel.sharding.fsdp_rows``).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
from torch import nn

from .blocks import make_blocks
from .collectives import Collectives, LocalCollectives
from .params import ParamLayout, assign_flat, flatten_grads, flatten_state, stack_flat
from .projection import DEFAULT_CHUNK_BYTES, Projection, build_projection
from .schedules import ScheduleSpec, make_optimizer, make_scheduler
from .subspace import RAW_BASES


class ParamShard(Protocol):
    """The model coordinates this rank owns (``numel`` of them, in a fixed order) and the
    way between them and the model."""

    numel: int

    def gradient(self) -> torch.Tensor:
        """(numel,) the gradient now in the model, summed over ranks, on the owned coordinates."""

    def write(self, own: torch.Tensor) -> None:
        """Put the owned coordinates' weights (numel,) into the model (a collective)."""

    def gather(self, own: torch.Tensor) -> torch.Tensor:
        """Every rank's owned weights -> the full (D,) vector, in layout order (a collective)."""


class ReplicatedShard:
    """Every rank holds the whole model and owns the coordinates ``comm.ranges[rank]`` of its
    flat parameter vector: steps 2 and 5 are ``comm``'s reduce-scatter and all-gather."""

    def __init__(self, model: nn.Module, comm: Collectives, num_params: int, device) -> None:
        self.model = model
        self.comm = comm
        start, end = comm.ranges[comm.rank]
        self.numel = end - start
        self._grad = torch.empty(num_params, device=device)
        self._weights = torch.empty(num_params, device=device)

    def gradient(self) -> torch.Tensor:
        return self.comm.reduce_scatter_sum(flatten_grads(self.model, self._grad))

    def write(self, own: torch.Tensor) -> None:
        assign_flat(self.model, self.gather(own))

    def gather(self, own: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(own, self._weights)


class TWA:
    """Trainable Weight Averaging over a projection, in the spirit of torch.optim.swa_utils.

    Args:
        model: the model whose trainable parameters are w (D values); it is moved to
            the start point w(X0) at construction (the SWA point for the journal bases).
        projection: Q and c for this rank's run of blocks (all blocks with one process).
        num_blocks: L, the number of blocks of the whole model.
        block_range: (l0, l1), the blocks this rank's projection covers.
        optimizer: "sgd" or "adamw" over X; lr, momentum, nesterov as usual;
            weight_decay where the projection's algorithm puts it (the module docstring).
        schedule: a ScheduleSpec (steps = ``step()`` calls); None = constant.
        grad_clip: clip the model gradient's global norm to this value (None = off).
        collectives: how ranks combine; default: one process.
        shard: the coordinates this rank owns and their way to the model (``ParamShard``);
            default: ``ReplicatedShard`` over ``collectives``' ranges.

    Example (the ``twa_ray.core`` docstring has a runnable one)::

        twa = TWA.from_candidates(model, [sd1, sd2, sd3], bits=4, lr=0.1)
        for x, y in loader:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            twa.step()
        recalibrate_bn(model, loader)
    """

    def __init__(
        self,
        model: nn.Module,
        projection: Projection,
        num_blocks: int,
        block_range: tuple[int, int] | None = None,
        *,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        schedule: ScheduleSpec | None = None,
        grad_clip: float | None = None,
        collectives: Collectives | None = None,
        shard: ParamShard | None = None,
    ) -> None:
        self.model = model
        self.layout = ParamLayout.from_model(model)
        self.projection = projection
        self.num_blocks = num_blocks
        self.block_range = block_range or (0, num_blocks)
        self.comm = collectives or LocalCollectives(self.layout.num_params)
        device = projection.data.device
        self.shard = shard or ReplicatedShard(model, self.comm, self.layout.num_params, device)
        if self.shard.numel != projection.numel:
            raise ValueError(
                f"rank {self.comm.rank} owns {self.shard.numel} coordinates but its projection has {projection.numel}"
            )
        if self.block_range[1] - self.block_range[0] != projection.num_blocks:
            raise ValueError(f"block_range {self.block_range} does not match {projection.num_blocks} projection blocks")
        self.grad_clip = grad_clip
        self.X = torch.zeros(projection.n, num_blocks, device=device, requires_grad=True)
        if projection.start is not None:  # every rank knows its blocks' start: summed, X0 everywhere
            with torch.no_grad():
                x0 = torch.zeros_like(self.X)
                x0[:, self.block_range[0] : self.block_range[1]] = projection.start
                self.X.copy_(self.comm.all_reduce_sum(x0))
        # ICLR'23 with SGD: weight decay on w, through the coefficient gradient (not the optimizer's)
        self.weight_decay_on_weights = (
            weight_decay if projection.basis_name in RAW_BASES and optimizer == "sgd" and weight_decay else 0.0
        )
        opt_decay = 0.0 if self.weight_decay_on_weights else weight_decay
        self.optimizer = make_optimizer([self.X], optimizer, lr, momentum, opt_decay, nesterov)
        self.scheduler = make_scheduler(self.optimizer, schedule or ScheduleSpec(kind="constant"))
        self.num_steps = 0
        self._own = torch.empty(projection.numel, device=device)  # w(X) on the owned coordinates
        self._write_weights()

    @classmethod
    def from_candidates(
        cls,
        model: nn.Module,
        candidates: torch.Tensor | Sequence[torch.Tensor | dict],
        *,
        bits: int = 32,
        granularity: str = "tensor",
        basis: str = "normalized",
        start: str | int = "mean",
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        kernel: str = "auto",
        **kwargs: Any,
    ) -> "TWA":
        """One-process TWA from candidates: an (n, D) matrix, or a list of flat vectors
        or state_dicts of ``model``'s architecture. ``start`` ("mean", "last" or a candidate
        index; ``checkpoints`` basis only) is where X starts; ``kernel``: the projection
        kernels (``twa_ray.core.kernels.KERNELS``: "auto" or a registered name)."""
        layout = ParamLayout.from_model(model)
        if isinstance(candidates, torch.Tensor):
            w = candidates.float().clone()
        else:
            w = stack_flat(
                flatten_state(c, layout, f"candidate {i}") if isinstance(c, dict) else c
                for i, c in enumerate(candidates)
            )
        if w.shape[1] != layout.num_params:
            raise ValueError(f"candidates have {w.shape[1]} values, model has {layout.num_params}")
        device = next(model.parameters()).device
        blocks = make_blocks(layout.numels, granularity)
        proj = build_projection(w.to(device), blocks.sizes, basis, bits, max_chunk_bytes=max_chunk_bytes, start=start,
                                kernel=kernel)
        return cls(model, proj, len(blocks), **kwargs)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def coefficient_grad(self) -> torch.Tensor:
        """The coefficient gradient G (n, L) of the gradient now in the model (steps 1-3),
        with the ICLR'23 weight decay on the weights when it applies."""
        g_own = self.shard.gradient()
        grad = torch.zeros_like(self.X)
        l0, l1 = self.block_range
        clip = 1.0
        if self.grad_clip is not None:
            norm2 = self.comm.all_reduce_sum(g_own.double().pow(2).sum().reshape(1))
            clip = min(1.0, self.grad_clip / (float(norm2.sqrt()) + 1e-6))
        if self.weight_decay_on_weights:
            # one projection of (clipped g) + wd * w: the decay is not clipped, as in torch's optimizers
            decayed = torch.add(g_own * clip, self._own, alpha=self.weight_decay_on_weights)
            grad[:, l0:l1] = self.projection.coef_grad(decayed)
        else:
            grad[:, l0:l1] = self.projection.coef_grad(g_own)
            if clip != 1.0:
                grad.mul_(clip)
        return self.comm.all_reduce_sum(grad)

    def step(self) -> None:
        """Update X from the model's current gradient and move the model to w(X).

        A non-finite coefficient gradient (the loss became NaN or Inf) raises
        FloatingPointError naming the step, with X and the model left unchanged.
        """
        grad = self.coefficient_grad()
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError(f"TWA step {self.num_steps}: the coefficient gradient is not finite (loss NaN or Inf?)")
        self.X.grad = grad
        self.optimizer.step()
        self.scheduler.step()
        self.num_steps += 1
        self._write_weights()

    @torch.no_grad()
    def weights(self) -> torch.Tensor:
        """w(X) as a full (D,) vector (a collective: every rank must call it)."""
        return self.shard.gather(self._reconstruct())

    def _reconstruct(self) -> torch.Tensor:
        """w(X) on the owned coordinates, (numel,), kept for the weight decay on the weights."""
        l0, l1 = self.block_range
        return self.projection.reconstruct(self.X.detach()[:, l0:l1], out=self._own)

    @torch.no_grad()
    def _write_weights(self) -> None:
        self.shard.write(self._reconstruct())

    def state_dict(self) -> dict:
        return {
            "X": self.X.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["X"].shape) != tuple(self.X.shape):
            raise ValueError(f"coefficients have shape {list(state['X'].shape)}, expected {list(self.X.shape)}")
        with torch.no_grad():
            self.X.copy_(state["X"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.num_steps = int(state["num_steps"])
        self._write_weights()
