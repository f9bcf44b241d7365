"""A sharded checkpoint's ``.metadata`` is data from outside: it must not make loading read
a file outside the checkpoint folder (an absolute or ``../`` path, a link that leads out,
a byte range past the end of its file) nor allocate tensors of sizes it alone chose. Each
refusal is a ValueError naming the folder and the key / file, raised before a byte is read.

One process, no process group: a tiny DCP checkpoint per test, its ``.metadata`` edited."""
import dataclasses
import math
import os
import pickle
import re

import pytest
import torch

from twa_ray.parallel.checkpoint_files import load_sharded, read_sharded

W = torch.arange(6, dtype=torch.float32).reshape(2, 3)
B = torch.ones(3)
SHAPES = {"w": (2, 3), "b": (3,)}
HUGE = 2 ** 40  # elements: what no test may ever allocate
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save in one process


@pytest.fixture
def ckpt(tmp_path):
    """A one-rank DCP checkpoint of {"model": {"w", "b"}} in tmp_path/ckpt, and beside it
    (outside the folder) victim.pt: a torch file holding a (2, 3) tensor of 666s."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "ckpt"
    dcp.save({"model": {"w": W.clone(), "b": B.clone()}}, checkpoint_id=str(folder), no_dist=True)
    torch.save(torch.full((2, 3), 666.0), tmp_path / "victim.pt")
    return folder


def _edit(folder, edit) -> None:
    """Rewrite ``folder``'s .metadata after ``edit(metadata)`` (the test's own file: plain pickle)."""
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    edit(metadata)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _point(fqn: str, **change):
    """An edit that changes the storage entry of ``fqn`` (relative_path, offset, length, ...)."""
    def edit(metadata):
        for index, info in list(metadata.storage_data.items()):
            if index.fqn == fqn:
                metadata.storage_data[index] = dataclasses.replace(info, **change)
    return edit


@pytest.fixture
def no_reads(monkeypatch):
    """Fails the test when anything is torch.load-ed (DCP reads every tensor chunk so)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint file was read")
    monkeypatch.setattr(torch, "load", refuse)


def _load(folder):
    model = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    load_sharded(folder, {"model": model}, no_dist=True)
    return model


def test_a_clean_checkpoint_loads_also_through_a_link_to_its_folder(ckpt):
    link = ckpt.parent / "link"
    os.symlink(ckpt, link)
    for folder in (ckpt, link):
        model = _load(folder)
        assert torch.equal(model["w"], W) and torch.equal(model["b"], B)
    assert read_sharded(link, "model", SHAPES)["w"].equal(W)


@pytest.mark.parametrize("where", ["absolute", "parent", "nested parent"])
def test_a_storage_path_outside_the_folder_is_refused(ckpt, no_reads, where):
    victim = ckpt.parent / "victim.pt"
    path = {"absolute": str(victim), "parent": "../victim.pt", "nested parent": "sub/../../victim.pt"}[where]
    os.mkdir(ckpt / "sub")  # so that the nested path opens today
    _edit(ckpt, _point("model.w", relative_path=path, offset=0, length=victim.stat().st_size))
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(ckpt))}: 'model.w' is stored in "
                                         rf"'{re.escape(path)}', outside the checkpoint folder: refused"):
        _load(ckpt)


def test_a_link_leading_out_of_the_folder_is_refused(ckpt, no_reads):
    victim = ckpt.parent / "victim.pt"
    os.symlink(victim, ckpt / "escape.distcp")
    _edit(ckpt, _point("model.w", relative_path="escape.distcp", offset=0, length=victim.stat().st_size))
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(ckpt))}: 'model.w' is stored in "
                                         r"'escape.distcp', which leads to .*victim.pt, outside the checkpoint "
                                         r"folder: refused"):
        _load(ckpt)


@pytest.mark.parametrize("offset, extra", [(-1, 0), (0, 1), (1, 1)])
def test_a_byte_range_past_its_file_is_refused(ckpt, no_reads, offset, extra):
    size = (ckpt / "__0_0.distcp").stat().st_size
    _edit(ckpt, _point("model.w", offset=offset, length=size - max(offset, 0) + extra))
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(ckpt))}: 'model.w' is stored at bytes .* of "
                                         r"'__0_0.distcp'"):
        _load(ckpt)


@pytest.fixture
def small_allocations_only(monkeypatch):
    """torch.empty fails the test for a tensor over a million elements (recorded in the list)."""
    real, sizes = torch.empty, []

    def empty(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        sizes.append(shape)
        if math.prod(shape) > 10 ** 6:
            raise AssertionError(f"allocated {shape} as the checkpoint's metadata said")
        return real(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    return sizes


def test_read_sharded_allocates_only_the_models_entries(ckpt, small_allocations_only):
    """A key the model lacks is neither allocated nor read, whatever size its metadata claims."""
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, TensorProperties,
                                                       TensorStorageMetadata)

    def add_huge(metadata):
        metadata.state_dict_metadata["model.huge"] = TensorStorageMetadata(
            TensorProperties(dtype=torch.float32), torch.Size([HUGE]),
            [ChunkStorageMetadata(torch.Size([0]), torch.Size([HUGE]))])
    _edit(ckpt, add_huge)
    got = read_sharded(ckpt, "model", SHAPES)
    assert set(got) == {"w", "b"} and got["w"].equal(W) and got["b"].equal(B)
    assert all(math.prod(s) < 10 for s in small_allocations_only)


def test_read_sharded_refuses_a_size_or_key_the_model_does_not_have(ckpt, small_allocations_only):
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(ckpt))} holds no tensor 'model.gone'"):
        read_sharded(ckpt, "model", {**SHAPES, "gone": (1,)})

    def grow(metadata):
        metadata.state_dict_metadata["model.w"].size = torch.Size([HUGE])
    _edit(ckpt, grow)
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(ckpt))}: 'model.w' has shape \[{HUGE}\], "
                                         r"expected \[2, 3\]"):
        read_sharded(ckpt, "model", SHAPES)
    assert small_allocations_only == []  # refused before anything was allocated
    assert read_sharded(ckpt, "nothing", SHAPES) == {}  # a part the checkpoint does not hold


def test_a_transformed_entry_is_refused(ckpt, no_reads):
    """DCP's stream transforms (zstd): never written here, a decompression bomb when read."""
    _edit(ckpt, _point("model.b", transform_descriptors=["zstandard/1"]))
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(ckpt))}: 'model.b' is stored with transforms "
                                         r"\['zstandard/1'\]"):
        _load(ckpt)
