"""The native CPU projection kernels (``projection_kernels.cpp``), built on first use.

``load()`` compiles the C++ source with ``torch.utils.cpp_extension.load`` the first time
a process asks for it and returns the module; the build is cached under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), in a folder named after
the hash of the source, the flags and torch's version, so later processes only load it (the
finished build directly, without ninja, whose path and mtime checks rebuilt it for every other
checkout), and an edited source never meets an older build. cpp_extension holds a file lock while it builds: processes that start at
once (Ray workers) build once, the others wait for that build. The binary is compiled
without ``-march`` flags and picks its AVX-512, AVX2 or portable code at run time, so a
cache shared between machines is safe. Where no compiler exists or the build fails, ``load()`` logs one
warning and returns None: a projection then gets the eager kernel when it is built.

``coef_grad`` and ``reconstruct`` check their tensors (dtype, device, shape, contiguity)
before handing pointers to the C++ code; ``twa_ray.core.kernels.NativeKernel`` calls them
on a projection's whole run of blocks. They run on ``torch.get_num_threads()`` threads
(results do not depend on it).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("projection_kernels.cpp")
CFLAGS = ["-O3"]
# instruction sets the C++ code can be asked for (tests run the portable code on any CPU)
ISAS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module": the module or None, "error": why not


def missing_tools() -> list[str]:
    """The build tools cpp_extension needs and cannot find: the C++ compiler ($CXX, default
    c++) and ninja."""
    missing = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        missing.append(f"C++ compiler {compiler!r}")
    try:
        cpp_extension = _cpp_extension()
        if not cpp_extension.is_ninja_available():
            missing.append("ninja")
    except ImportError:
        missing.append("torch.utils.cpp_extension")
    return missing


def load():
    """The compiled module, or None (one warning per process says why)."""
    with _lock:
        if "module" not in _state:
            _state["module"], _state["error"] = _build()
            if _state["module"] is None:
                log.warning("native projection kernels unavailable, using the eager kernels: %s", _state["error"])
        return _state["module"]


def available() -> bool:
    return load() is not None


def build_error() -> str | None:
    """Why ``load()`` returned None (None before a load, or when it succeeded)."""
    return _state.get("error")  # type: ignore[return-value]


def _build():
    missing = missing_tools()
    if missing:
        return None, f"missing {', '.join(missing)}"
    key = SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode()  # the .so links libtorch
    digest = hashlib.sha256(key).hexdigest()[:16]
    name = f"twa_ray_projection_{digest}"
    module = _load_built(name)
    if module is not None:
        return module, None
    try:
        module = _cpp_extension().load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure: the eager kernels remain
        text = str(exc).strip()
        return None, f"build of {SOURCE.name} failed ({type(exc).__name__}): {text[-2000:]}"
    return module, None


def _load_built(name: str):
    """The module a finished earlier build left in the cache, loaded without asking ninja (None:
    build it). Its name holds the hash of the source, the flags and torch's version, so it is
    this source's build; ninja would rebuild it whenever the source's path or mtime differs from
    the last build's (another checkout, a git checkout): a stage then spent up to a minute
    compiling at start-up. Loaded under cpp_extension's lock: a build in progress ends first."""
    import importlib.util

    try:
        folder = Path(_cpp_extension()._get_build_directory(name, verbose=False))
    except Exception:  # noqa: BLE001 - a private helper of cpp_extension: build the usual way
        return None
    library = folder / f"{name}.so"
    if not library.is_file():
        return None
    from filelock import FileLock  # cpp_extension's own lock (torch needs filelock): a build in progress ends first

    try:
        with FileLock(str(folder / "lock")):
            spec = importlib.util.spec_from_file_location(name, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - a broken file: let cpp_extension rebuild it
        return None
    return module


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its warning that no CUDA runtime exists
    (these kernels are CPU code)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def isa() -> str | None:
    """The code path the kernels use on this CPU ("avx512", "avx2" or "portable"; None: not built)."""
    module = load()
    return None if module is None else module.isa()


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous CPU {dtype} tensor of shape {shape}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device} (contiguous: {t.is_contiguous()})")


def _packed_cols(sizes: torch.Tensor, bits: int) -> int:
    return int(((sizes * bits + 7) // 8).sum())


def num_tiles(sizes: torch.Tensor) -> int:
    """Tiles the kernels cut a run of blocks into (rows of ``code_sums``)."""
    tile = _module().TILE
    return int(((sizes + tile - 1) // tile).sum())


def code_sums(data: torch.Tensor, sizes: torch.Tensor, bits: int) -> torch.Tensor:
    """(tiles, n) int32: each candidate row's sum of code - 2^(b-1) over each tile;
    ``coef_grad`` needs them (computed once per projection)."""
    module = _module()
    n, cols = data.shape
    num_blocks = sizes.shape[0]
    _check("sizes", sizes, torch.int64, (num_blocks,))
    _check("data", data, torch.uint8, (n, _packed_cols(sizes, bits)))
    out = torch.empty(num_tiles(sizes), n, dtype=torch.int32, device="cpu")
    module.code_sums(data.data_ptr(), n, cols, sizes.data_ptr(), num_blocks, bits, out.data_ptr(),
                     torch.get_num_threads())
    return out


def coef_grad(data: torch.Tensor, g: torch.Tensor, sizes: torch.Tensor, sums: torch.Tensor, bits: int,
              isa: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dot products of a run of blocks' centred codes with the gradient.

    data (n, C) uint8: the packed codes; g (m,) float32; sizes (L,) int64; sums: their
    ``code_sums`` -> dot (n, L) float64, dot[i, l] = sum_e (code_ie - 2^(b-1)) * g_e over
    block l, and g_sum (L,) float64, the sums of g per block. Per tile t the gradient is
    centred on its mean, gc = fl(g - mean_t); the products with gc are added in float32
    (at most TILE <= ``kernels.chunks.SUM_PIECE`` of them), then in float64 with mean_t times
    the tile's code sum.
    """
    module = _module()
    n, cols = data.shape
    num_blocks = sizes.shape[0]
    _check("sizes", sizes, torch.int64, (num_blocks,))
    _check("data", data, torch.uint8, (n, _packed_cols(sizes, bits)))
    _check("g", g, torch.float32, (int(sizes.sum()),))
    _check("sums", sums, torch.int32, (num_tiles(sizes), n))
    dot = torch.empty(n, num_blocks, dtype=torch.float64, device="cpu")
    g_sum = torch.empty(num_blocks, dtype=torch.float64, device="cpu")
    module.coef_grad(data.data_ptr(), n, cols, g.data_ptr(), sizes.data_ptr(), num_blocks, sums.data_ptr(), bits,
                     dot.data_ptr(), g_sum.data_ptr(), torch.get_num_threads(), ISAS[isa])
    return dot, g_sum


def reconstruct(data: torch.Tensor, weights: torch.Tensor, base: torch.Tensor, center: torch.Tensor,
                sizes: torch.Tensor, bits: int, out: torch.Tensor, isa: str = "auto") -> torch.Tensor:
    """out (m,) float32 = center + base[l] + sum_i weights[l, i] * (code_ie - 2^(b-1)) on
    block l; data (n, C) uint8, weights (L, n), base (L,), center (m,) float32, sizes (L,)
    int64. The sum over candidates is in float32. Where out is at least the module's
    ``STREAM_BYTES`` and 64-byte aligned, the AVX-512 code writes it with non-temporal
    stores (same values; such outputs do not stay in the caches anyway)."""
    module = _module()
    n, cols = data.shape
    num_blocks = sizes.shape[0]
    m = int(sizes.sum())
    _check("sizes", sizes, torch.int64, (num_blocks,))
    _check("data", data, torch.uint8, (n, _packed_cols(sizes, bits)))
    _check("weights", weights, torch.float32, (num_blocks, n))
    _check("base", base, torch.float32, (num_blocks,))
    _check("center", center, torch.float32, (m,))
    _check("out", out, torch.float32, (m,))
    module.reconstruct(data.data_ptr(), n, cols, weights.data_ptr(), base.data_ptr(), center.data_ptr(),
                       out.data_ptr(), sizes.data_ptr(), num_blocks, bits, torch.get_num_threads(), ISAS[isa])
    return out


def _module():
    module = load()
    if module is None:
        raise RuntimeError(f"the native projection kernels are not available: {build_error()}")
    return module
