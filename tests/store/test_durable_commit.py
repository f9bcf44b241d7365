"""Local commits are durable and exclusive: the file is fsynced before its rename / link and
its folder after, so a power loss cannot leave a committed candidate empty; where hard links
are unsupported (SMB, some FUSE mounts) two commits to one name never both succeed.

Fast, CPU only, no Ray. Every race is forced by a barrier inside os.replace, so the tests
cannot pass by luck of timing."""
from __future__ import annotations

import errno
import os
import threading

import pyarrow.fs as pafs
import pytest
import torch

from twa_ray.store import CandidateStore
from twa_ray.store import fs as store_fs


@pytest.fixture
def events(monkeypatch):
    """[(what, path...)] of every os.fsync (the path its fd has open), os.link, os.replace and
    os.unlink, in call order."""
    log = []
    real = {name: getattr(os, name) for name in ("fsync", "link", "replace", "unlink")}

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real["fsync"](fd)

    def recorder(name):
        def call(*paths, **kwargs):
            log.append((name, *map(os.fspath, paths)))
            return real[name](*paths, **kwargs)
        return call

    monkeypatch.setattr(os, "fsync", fsync)
    for name in ("link", "replace", "unlink"):
        monkeypatch.setattr(os, name, recorder(name))
    return log


def _store(tmp_path) -> CandidateStore:
    torch.manual_seed(0)
    return CandidateStore.create_for_model(str(tmp_path / "store"), torch.nn.Linear(3, 2))


def _candidate(value: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((2, 3), value), "bias": torch.full((2,), value)}


def test_a_candidate_commit_fsyncs_the_file_before_its_link_and_the_folder_after(tmp_path, events):
    store = _store(tmp_path)
    events.clear()
    index = store.append(_candidate(1.0))
    final = os.path.realpath(store._candidate_path(index))
    folder = os.path.dirname(final)
    moves = [e for e in events if e[0] in ("link", "replace")]
    assert len(moves) == 1 and os.path.realpath(moves[0][2]) == final
    tmp = os.path.realpath(moves[0][1])
    at = events.index(moves[0])
    assert ("fsync", tmp) in events[:at]  # the data is on disk before the name points at it
    assert ("fsync", folder) in events[at + 1:]  # the new name is on disk before append returns
    last_unlink = max((i for i, e in enumerate(events) if e[0] == "unlink"), default=at)
    assert events.index(("fsync", folder), at + 1) > last_unlink  # the temporary name's removal too


def test_a_replacing_write_fsyncs_the_file_and_its_folder(tmp_path, events):
    loc = store_fs.resolve(tmp_path / "meta.json")
    assert store_fs.write_bytes_atomic(loc.fs, loc.path, b"{}")
    (what, tmp, final), = [e for e in events if e[0] == "replace"]
    at = events.index((what, tmp, final))
    assert ("fsync", os.path.realpath(tmp)) in events[:at]
    assert ("fsync", os.path.realpath(tmp_path)) in events[at + 1:]


def test_a_run_folder_write_fsyncs_the_file_and_its_folder(tmp_path, events):
    """twa_ray.output.atomic's local writes commit through the same helper as the store."""
    from twa_ray.output.atomic import write_json

    write_json(tmp_path / "summary.json", {"test_acc": 1.0})
    (what, tmp, final), = [e for e in events if e[0] == "replace"]
    assert final == str(tmp_path / "summary.json")
    at = events.index((what, tmp, final))
    assert ("fsync", os.path.realpath(tmp)) in events[:at]
    assert ("fsync", os.path.realpath(tmp_path)) in events[at + 1:]


@pytest.fixture
def no_hard_links(monkeypatch):
    """Call it to make os.link fail as on SMB, and the next two os.replace calls wait for each
    other (up to 2 s: a commit that is not let to replace times the barrier out), so that
    two commits that both reach their rename do rename together."""
    def link(src, dst, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted", dst)

    barrier, calls, real_replace = threading.Barrier(2, timeout=2.0), [], os.replace

    def replace(src, dst, **kwargs):
        calls.append(dst)
        if len(calls) <= 2:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
        return real_replace(src, dst, **kwargs)

    def arm():
        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(os, "replace", replace)
    return arm


def _race(*commits):
    """Run the callables at once in threads; their results (or exceptions) in order."""
    results = [None] * len(commits)
    start = threading.Barrier(len(commits))

    def run(i):
        start.wait()
        try:
            results[i] = commits[i]()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(commits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_without_hard_links_two_racing_commits_to_one_name_one_wins(tmp_path, no_hard_links):
    final = str(tmp_path / "cand-000000.arrow")
    tmps = [store_fs.temp_name(final) for _ in range(2)]
    for i, tmp in enumerate(tmps):
        with open(tmp, "wb") as f:
            f.write(b"writer %d" % i)
    fs = pafs.LocalFileSystem()
    no_hard_links()
    results = _race(*(lambda tmp=tmp: store_fs.move_into_place(fs, tmp, final, overwrite=False) for tmp in tmps))
    assert sorted(results) == [False, True]
    winner = results.index(True)
    with open(final, "rb") as f:
        assert f.read() == b"writer %d" % winner
    assert os.path.exists(tmps[1 - winner])  # the loser's file is left for its caller, as before
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(final), os.path.basename(tmps[1 - winner])])


def test_without_hard_links_two_racing_appends_get_two_indices(tmp_path, no_hard_links):
    store = _store(tmp_path)
    no_hard_links()
    results = _race(lambda: store.append(_candidate(1.0)), lambda: store.append(_candidate(2.0)))
    assert sorted(results) == [0, 1]
    reopened = CandidateStore.open(store.uri)
    assert len(reopened.list_candidates()) == 2
    for value, index in zip((1.0, 2.0), results):  # neither overwrote the other
        assert torch.equal(reopened.read_candidate(index)["bias"], torch.full((2,), value))
