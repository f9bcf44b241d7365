"""The triton kernel: Triton chunk kernels (``twa_ray.core.kernels_triton``) in place of
each single-block chunk's unpack and matrix-vector product of the eager kernel, on CUDA
tensors (CPU ones only under the Triton interpreter, for tests). Opt-in: not yet measured
on a GPU, so ``auto`` never picks it.

Without the triton package, or where a kernel fails to compile or launch, one warning and
the eager kernels. Whether Triton works is the process's (the package, the driver and
compiler, ``TRITON_INTERPRET``), not a projection's, so the class keeps the answer for the
process (``_failure``), as a compiled module is kept: the first projection that asks
compiles and launches both kernels once on its own first chunk when it is built (the
variant its first call would compile anyway); a failure there or in a later launch makes
every later projection, and every later call of this class, run eager, said once.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import torch

from .. import kernels_triton
from .eager import EagerKernel, Work

if TYPE_CHECKING:
    from ..projection import Projection

log = logging.getLogger(__name__)


class TritonKernel(EagerKernel):
    """The eager chunk loop with Triton chunk kernels (b < 32)."""

    name = "triton"
    # why the Triton kernels do not work in this process (None: they do, as far as known)
    _failure: ClassVar[str | None] = None
    _warned: ClassVar[set[str]] = set()  # the warnings said in this process

    @classmethod
    def check_device(cls, device: torch.device) -> None:
        try:
            kernels_triton.require_triton(device)
        except ImportError:  # not installed: available() says so, and eager runs
            pass
        except RuntimeError as exc:
            raise ValueError(str(exc)) from exc

    @classmethod
    def available(cls, device: torch.device) -> bool:
        try:
            kernels_triton.require_triton(device)
        except ImportError as exc:
            cls._warn_once("import", "the triton projection kernels are unavailable, using the eager kernels: %s", exc)
            return False
        return TritonKernel._failure is None

    @classmethod
    def create(cls, proj: "Projection") -> EagerKernel:
        kernel = cls(proj)
        try:
            kernel._compile(proj)
        except Exception as exc:  # noqa: BLE001 - any compile or launch failure: eager
            cls._failed(exc)
            return EagerKernel(proj)
        return kernel

    def _compile(self, proj: "Projection") -> None:
        """Compile and launch both kernels on the first single-block chunk (its codes, zero
        weights): Triton compiles on a kernel's first launch."""
        if not self._single:
            return
        ch = self._single[0]
        raw = proj.data[:, ch.col_start : ch.col_end]
        kernels_triton.triton_grad(raw, torch.zeros(8 // self.bits, raw.shape[1], device=raw.device), self.bits)
        kernels_triton.triton_reconstruct(raw, torch.zeros(self.n, device=raw.device), self.bits)

    @classmethod
    def _failed(cls, exc: BaseException) -> None:
        TritonKernel._failure = f"{type(exc).__name__}: {exc}"
        cls._warn_once("run", "a triton projection kernel failed (%s); using the eager kernels", TritonKernel._failure)

    @classmethod
    def _warn_once(cls, key: str, message: str, *args) -> None:
        if key not in TritonKernel._warned:
            TritonKernel._warned.add(key)
            log.warning(message, *args)

    def _chunk_dot(self, raw: torch.Tensor, gt: torch.Tensor, out: torch.Tensor, work: Work) -> None:
        if TritonKernel._failure is None:
            try:
                out[0].copy_(kernels_triton.triton_grad(raw, gt, self.bits))
                out[1:].zero_()
                return
            except Exception as exc:  # noqa: BLE001 - any kernel failure: fall back
                self._failed(exc)
        super()._chunk_dot(raw, gt, out, work)

    def _chunk_combine(self, raw: torch.Tensor, w: torch.Tensor, dst: torch.Tensor, work: Work) -> None:
        if TritonKernel._failure is None:
            try:
                res = kernels_triton.triton_reconstruct(raw, w, self.bits)  # (per, B), codes times 2^(k*b)
            except Exception as exc:  # noqa: BLE001 - any kernel failure: fall back
                self._failed(exc)
            else:
                self._add_interleaved(res, dst)
                return
        super()._chunk_combine(raw, w, dst, work)
