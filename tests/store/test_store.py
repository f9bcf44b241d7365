"""Tests for twa_ray.store (the Arrow candidate store). Fast, CPU only, no Ray."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch

import twa_ray.store.write as cs_module
from conftest import ROOT
from twa_ray.store import CandidateStore, candidate_file_name, parameter_mismatch
from twa_ray.store.fs import absolute


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),  # 0.weight (4,3,3,3), 0.bias (4,)
        torch.nn.BatchNorm2d(4),  # 1.weight, 1.bias (buffers not stored)
        torch.nn.Flatten(),
        torch.nn.Linear(16, 5),  # 3.weight (5,16), 3.bias (5,)
    )


def _names_shapes(model):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in params], [tuple(p.shape) for _, p in params]


def _fill(store: CandidateStore, n: int = 5) -> torch.Tensor:
    """Append n random candidates (as dicts); returns their flat vectors, shape (n, D)."""
    flats = []
    for i in range(n):
        tensors = {name: torch.randn(shape, dtype=torch.float64) for name, shape in zip(store.names, store.shapes)}
        idx = store.append(tensors, info={"epoch": i, "metrics": {"acc": 0.5 + i / 10}, "source": "test"})
        assert idx == i
        flats.append(torch.cat([tensors[name].reshape(-1).float() for name in store.names]))
    return torch.stack(flats)


@pytest.fixture
def model():
    return _model()


@pytest.fixture
def store(tmp_path, model):
    names, shapes = _names_shapes(model)
    return CandidateStore.create(tmp_path / "store", names, shapes, meta={"model": "tiny", "data": {"n": 3}})


def test_write_read_projection(store):
    full = _fill(store, 5)
    assert len(store) == 5
    D = store.num_params
    assert D == sum(store.numels) == full.shape[1]
    out = store.read()
    assert out.shape == (5, D) and out.dtype == torch.float32
    torch.testing.assert_close(out, full, rtol=0, atol=0)
    out[0, 0] = 123.0  # writable, no warning path

    off = store.offsets
    names = store.names
    # subset by name, in a non-store order
    sel = [names[3], names[0]]
    want = torch.cat([full[:, off[3]:off[4]], full[:, off[0]:off[1]]], dim=1)
    torch.testing.assert_close(store.read(columns=sel), want, rtol=0, atol=0)
    # same by index
    torch.testing.assert_close(store.read(columns=[3, 0]), want, rtol=0, atol=0)
    # candidate subset, rows in the order given
    got = store.read(columns=["3.weight"], candidates=[4, 1])
    torch.testing.assert_close(got, full[[4, 1]][:, off[4]:off[5]], rtol=0, atol=0)
    # empty selections
    assert store.read(columns=[], candidates=[0]).shape == (1, 0)
    assert store.read(candidates=[]).shape == (0, D)

    # per-candidate access
    torch.testing.assert_close(store.read_flat(2), full[2], rtol=0, atol=0)
    cand = store.read_candidate(2)
    assert list(cand) == names
    for i, (name, shape) in enumerate(zip(names, store.shapes)):
        assert cand[name].shape == shape and cand[name].dtype == torch.float32
        torch.testing.assert_close(cand[name].reshape(-1), full[2, off[i]:off[i + 1]], rtol=0, atol=0)

    with pytest.raises(IndexError, match="no candidate 9"):
        store.read(candidates=[9])
    with pytest.raises(KeyError, match="nope"):
        store.read(columns=["nope"])
    with pytest.raises(IndexError):
        store.read(columns=[len(names)])


def test_bytes_read_counts_only_selected_columns(store):
    _fill(store, 3)
    store.bytes_read = 0
    store.read(columns=["0.bias", "3.bias"], candidates=[0, 2])
    assert store.bytes_read == (4 + 5) * 2 * 4
    store.read()
    assert store.bytes_read == (4 + 5) * 2 * 4 + store.num_params * 3 * 4


def test_append_flat_and_model(store, model):
    D = store.num_params
    v = torch.linspace(-1, 1, D, dtype=torch.float16)
    idx = store.append_flat(v, info={"kind": "flat"})
    torch.testing.assert_close(store.read_flat(idx), v.float(), rtol=0, atol=0)
    idx2 = store.append_model(model, info={"kind": "model"})
    for name, p in model.named_parameters():
        torch.testing.assert_close(store.read_candidate(idx2)[name], p.detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=rf"expected \({D},\)"):
        store.append_flat(torch.zeros(D + 1))
    bad = torch.zeros(D)
    bad[store.offsets[4] + 2] = float("nan")  # inside 3.weight
    with pytest.raises(ValueError, match="'3.weight'"):
        store.append_flat(bad)


def test_metadata_roundtrip_and_listing_reads_no_weights(tmp_path, model):
    names, shapes = _names_shapes(model)
    dtypes = [torch.bfloat16] * len(names)
    meta = {"model": {"name": "tiny", "width": 4}, "data": "synthetic", "seed": 7}
    store = CandidateStore.create(tmp_path / "s", names, shapes, dtypes=dtypes, meta=meta)
    _fill(store, 4)

    again = CandidateStore.open(str(tmp_path / "s"))
    assert again.names == names
    assert again.shapes == shapes
    assert again.numels == [torch.Size(s).numel() for s in shapes]
    assert again.dtypes == ["bfloat16"] * len(names)
    assert again.meta == meta
    assert again.uri == str(tmp_path / "s")

    raw = json.loads((tmp_path / "s" / "store.json").read_text())
    assert raw["names"] == names and raw["shapes"] == [list(s) for s in shapes]

    cands = again.list_candidates()
    assert again.bytes_read == 0
    assert [c.index for c in cands] == [0, 1, 2, 3]
    assert cands[2].info == {"epoch": 2, "metrics": {"acc": 0.7}, "source": "test"}
    assert cands[2].path.endswith(candidate_file_name(2))
    assert len(again) == 4 and again.bytes_read == 0

    # the file layout is the contract: one row, one fixed_size_list<float32> column per tensor
    with pa.ipc.open_file(str(tmp_path / "s" / "candidates" / "cand-000001.arrow")) as r:
        assert r.schema.names == names
        assert r.schema.field(names[0]).type == pa.list_(pa.float32(), again.numels[0])
        assert json.loads(r.schema.metadata[b"twa_ray.info"]) == cands[1].info
        assert r.num_record_batches == 1 and r.get_batch(0).num_rows == 1

    # pickling (to hand a store to Ray workers)
    clone = pickle.loads(pickle.dumps(again))
    torch.testing.assert_close(clone.read(candidates=[3]), again.read(candidates=[3]))


def test_crash_safety(store, caplog, monkeypatch):
    full = _fill(store, 3)
    cand_dir = os.path.join(store.path, "candidates")
    with open(os.path.join(cand_dir, candidate_file_name(2)), "rb") as f:
        good = f.read()

    # 1) a writer killed while writing its temp file leaves a partial temp behind
    with open(os.path.join(cand_dir, ".cand.arrow.tmp-deadbeef"), "wb") as f:
        f.write(good[: len(good) // 2])
    # 2) a truncated final file (e.g. a non-atomic copy that crashed)
    with open(os.path.join(cand_dir, candidate_file_name(3)), "wb") as f:
        f.write(good[: len(good) - 40])

    reopened = CandidateStore.open(store.uri)
    with caplog.at_level(logging.WARNING, logger="twa_ray.store"):
        assert len(reopened) == 3
    assert any("cand-000003.arrow" in r.getMessage() for r in caplog.records)
    assert [c.index for c in reopened.list_candidates()] == [0, 1, 2]
    torch.testing.assert_close(reopened.read(), full, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unreadable"):
        reopened.read(candidates=[3])

    # the next append never overwrites the damaged file
    assert reopened.append_flat(torch.ones(store.num_params)) == 4
    assert [c.index for c in reopened.list_candidates()] == [0, 1, 2, 4]

    # 3) a writer that fails mid-write: nothing lands under a final name, temp cleaned up
    def crashing_write(fs, path, names, arrays, info_json):
        with fs.open_output_stream(path) as out:
            out.write(good[:100])
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(cs_module, "write_candidate_file", crashing_write)
    before = set(os.listdir(cand_dir))
    with pytest.raises(RuntimeError, match="simulated crash"):
        reopened.append_flat(torch.zeros(store.num_params))
    assert set(os.listdir(cand_dir)) == before
    assert len(CandidateStore.open(store.uri)) == 4


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: t.pop("3.bias"), r"missing parameter\(s\) \['3.bias'\]"),
        (lambda t: t.__setitem__("extra.weight", torch.zeros(2)), r"unexpected parameter\(s\) \['extra.weight'\]"),
        (lambda t: t.__setitem__("0.bias", torch.zeros(5)), r"'0.bias': shape \(5,\)"),
        (lambda t: t["1.weight"].__setitem__(1, float("nan")), r"'1.weight': 1 NaN"),
        (lambda t: t["3.weight"].__setitem__((0, 0), float("inf")), r"'3.weight': 0 NaN and 1 Inf"),
        (lambda t: t.__setitem__("0.bias", torch.tensor([1e39] * 4, dtype=torch.float64)), r"'0.bias'.*Inf"),
    ],
)
def test_validation_errors_name_parameter(store, mutate, match):
    tensors = {n: torch.zeros(s) for n, s in zip(store.names, store.shapes)}
    mutate(tensors)
    with pytest.raises(ValueError, match=match):
        store.append(tensors)
    assert len(store) == 0


def test_validation_list_form_and_types(store):
    tensors = [torch.zeros(s) for s in store.shapes]
    with pytest.raises(ValueError, match="3 tensors"):
        store.append(tensors[:3])
    tensors[1] = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="'0.bias'"):
        store.append(tensors)
    tensors[1] = torch.zeros(4)
    with pytest.raises(TypeError, match="JSON"):
        store.append(tensors, info={"x": object()})
    assert store.append(tensors) == 0


def test_create_exist_ok_and_errors(tmp_path, store, model):
    names, shapes = _names_shapes(model)
    _fill(store, 2)
    with pytest.raises(FileExistsError, match="already exists"):
        CandidateStore.create(store.uri, names, shapes)
    same = CandidateStore.create(store.uri, names, shapes, meta={"ignored": True}, exist_ok=True)
    assert len(same) == 2 and same.meta == store.meta
    bad_shapes = list(shapes)
    bad_shapes[0] = (8, 3, 3, 3)
    with pytest.raises(ValueError, match=f"{store.uri}.*'0.weight'"):
        CandidateStore.create(store.uri, names, bad_shapes, exist_ok=True)
    with pytest.raises(ValueError, match=str(store.uri)):
        CandidateStore.create(store.uri, names[:-1], shapes[:-1], exist_ok=True)


def test_open_missing_and_corrupt(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match="nothing"):
        CandidateStore.open(missing)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "store.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad/store\.json"):
        CandidateStore.open(tmp_path / "bad")
    (tmp_path / "bad" / "store.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"bad/store\.json"):
        CandidateStore.open(tmp_path / "bad")


def test_file_uri_equals_plain_path(tmp_path, model):
    names, shapes = _names_shapes(model)
    uri = "file://" + str(tmp_path / "viauri")
    store = CandidateStore.create(uri, names, shapes, meta={"k": 1})
    assert store.uri == uri and store.is_local
    full = _fill(store, 3)
    plain = CandidateStore.open(tmp_path / "viauri")
    torch.testing.assert_close(plain.read(columns=[1, 2]), store.read(columns=[1, 2]), rtol=0, atol=0)
    torch.testing.assert_close(plain.read(), full, rtol=0, atol=0)
    assert CandidateStore.open(uri).meta == {"k": 1}
    assert plain.list_candidates()[1].info == store.list_candidates()[1].info


class _CountingHandler(pafs.FileSystemHandler):
    """A non-local pyarrow filesystem over a local folder that counts bytes read."""

    def __init__(self):
        self.local = pafs.LocalFileSystem()
        self.read_bytes = 0

    def _counting(self, path):
        handler = self
        raw = open(path, "rb")

        class Counting(io.RawIOBase):
            def readable(self):
                return True

            def seekable(self):
                return True

            def seek(self, *a):
                return raw.seek(*a)

            def tell(self):
                return raw.tell()

            def readinto(self, b):
                n = raw.readinto(b)
                handler.read_bytes += n
                return n

            def close(self):
                raw.close()
                super().close()

        return pa.PythonFile(Counting(), mode="r")

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return path

    def equals(self, other):
        return self is other

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.local.delete_file(path)

    def move(self, src, dest):
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self.local.copy_file(src, dest)

    def open_input_stream(self, path):
        return self._counting(path)

    def open_input_file(self, path):
        return self._counting(path)

    def open_output_stream(self, path, metadata):
        return self.local.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        return self.local.open_append_stream(path)


def test_remote_like_filesystem_reads_only_selected_columns(tmp_path):
    handler = _CountingHandler()
    fs = pafs.PyFileSystem(handler)
    names = ["big", "small", "other"]
    shapes = [(200_000,), (10,), (50_000,)]
    store = CandidateStore.create(str(tmp_path / "remote"), names, shapes, filesystem=fs)
    assert not store.is_local
    for i in range(3):
        store.append([torch.full(s, float(i)) for s in shapes], info={"i": i})

    handler.read_bytes = 0
    assert [c.info["i"] for c in store.list_candidates()] == [0, 1, 2]
    footer_bytes = handler.read_bytes
    assert footer_bytes < 3 * 4096  # footers only

    store = CandidateStore.open(str(tmp_path / "remote"), filesystem=fs)
    handler.read_bytes = 0
    out = store.read(columns=["small"])
    assert out.shape == (3, 10) and torch.equal(out[:, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert store.bytes_read == 3 * 10 * 4
    total_file_bytes = sum(
        os.path.getsize(os.path.join(store.path, "candidates", candidate_file_name(i))) for i in range(3)
    )
    assert handler.read_bytes < 0.02 * total_file_bytes  # not the 'big'/'other' columns


def test_no_ray_import():
    code = "import sys, twa_ray.store; assert 'ray' not in sys.modules, 'twa_ray.store imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_absolute_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert absolute("runs/x") == str(tmp_path / "runs" / "x")
    assert absolute("~/data") == str(tmp_path / "home" / "data")
    assert absolute("/abs/path") == "/abs/path"
    for uri in ("s3://bucket/prefix", "file:///tmp/store", "gs://b/p/"):
        assert absolute(uri) == uri


def test_parameter_mismatch_names_the_first_difference():
    names, shapes = ["a", "b"], [(2, 3), (4,)]
    assert parameter_mismatch(names, shapes, ["a", "b"], [[2, 3], [4]]) is None  # lists and tuples alike
    assert parameter_mismatch(names, shapes, ["a", "c"], shapes) == "parameters differ: store only ['b'], model only ['c']"
    assert parameter_mismatch(names, shapes, ["b", "a"], shapes[::-1]) == "same parameter names in a different order"
    assert (parameter_mismatch(names, shapes, names, [(2, 3), (5,)], "stored", "requested")
            == "parameter 'b': stored shape [4], requested shape [5]")
