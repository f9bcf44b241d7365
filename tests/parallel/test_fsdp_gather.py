"""FSDP2's full weights exist on the rank that writes them only: a candidate for an object
store (``RowCandidateWriter``'s gather path) and TWA's final weights (``gather_rows``) are
gathered on rank 0; the other ranks send their rows and never hold a full tensor. Two gloo
ranks; what a rank holds is seen through every tensor its torch ops return."""
import fsspec
import pyarrow.fs as pafs
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import UnevenNet, SavesEveryStep
from twa_ray.core.params import ParamLayout
from twa_ray.parallel.local_ranks import spawn_ranks
from twa_ray.parallel.sharding.fsdp_candidates import RowCandidateWriter
from twa_ray.parallel.sharding.fsdp_rows import RowLayout, gather_rows, own_rows
from twa_ray.parallel.sharding.fsdp_tensors import fsdp_wrap
from twa_ray.store import CandidateStore

WORLD = 2


class LargestTensor(TorchDispatchMode):
    """Inside ``with``: ``numel``, the most elements of a plain tensor any torch op returned
    (a collective's output buffers included; DTensors, whose numel is the global one, are not
    counted: the local tensors their ops make are)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
                self.numel = max(self.numel, t.numel())
        return out


def _rank_main(rank: int, world: int, out: str, store_path: str) -> None:
    model = fsdp_wrap(UnevenNet(), world, torch.device("cpu"))
    # a store that cannot be written in pieces (not pyarrow's local filesystem): rank 0 gathers
    remote = CandidateStore.open(store_path, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("file"))))
    writer = RowCandidateWriter(SavesEveryStep(remote) if rank == 0 else None, store_path, rank, world, torch.device("cpu"))
    writer.store = remote  # the other ranks' instance too (they open the store by URI otherwise)
    with LargestTensor() as candidate:
        writer.save(model, kind="epoch", step=1, lr=0.1, metrics={})
    own = own_rows(list(model.parameters())) * 2.0  # TWA's center: this rank's rows
    with LargestTensor() as final:
        full = gather_rows(model, own, rank, world)
    torch.save({"candidate": candidate.numel, "final": final.numel, "full": full,
                "weights": [p.full_tensor().detach().reshape(-1) for p in model.parameters()]}, f"{out}/rank{rank}.pt")


def test_only_rank_0_gathers_the_full_weights(tmp_path):
    net = UnevenNet()
    store = CandidateStore.create_for_model(str(tmp_path / "store"), net)
    spawn_ranks(_rank_main, WORLD, str(tmp_path), store.path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    weights = torch.cat(ranks[0]["weights"])  # (D,)
    torch.testing.assert_close(store.read_flat(0), weights, rtol=0, atol=0)  # appended whole by rank 0
    torch.testing.assert_close(ranks[0]["full"], 2.0 * weights, rtol=0, atol=0)
    assert ranks[1]["full"] is None  # only the rank that writes the result holds it

    rows = RowLayout(ParamLayout.from_model(net), WORLD)
    shard = max(rows.numel(r) for r in range(WORLD))  # the most a rank holds of the vector
    largest = max(p.numel() for p in net.parameters())  # (5, 6): 15 on each rank, 30 gathered
    assert ranks[1]["candidate"] < largest and ranks[1]["final"] <= shard < weights.numel()
    assert ranks[0]["candidate"] >= largest and ranks[0]["final"] >= weights.numel()  # the probe sees them
