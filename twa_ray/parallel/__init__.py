"""Plain ``torch.distributed``, no Ray: what k ranks of one process group do together,
whoever started them (Ray Train's workers, ``local_ranks.spawn_ranks``, a user's torchrun).

    exchanges.py        how a blocks-sharded TWA step exchanges its vectors: one class per
                        ``twa.exchange`` behind ``EXCHANGES``
    sharding/           how the workers share the model: one class per ``sharding`` mode
                        behind ``SHARDING_MODES`` (``sharding_mode``)
    process_group.py    small collectives: sums, gathers, broadcasts, barriers
    batches.py          seeded global batches split across ranks
    evaluate.py         accuracy and loss, in one process or across ranks
    checkpoint_files.py the checkpoint folder format (state, JSON info, DCP shards), read safely
    local_ranks.py      a process group of local processes (tests, benchmarks)
"""
from __future__ import annotations

from .exchanges import EXCHANGES, make_exchange, resolve_exchange
from .sharding import SHARDING_MODES, sharding_mode

__all__ = ["EXCHANGES", "SHARDING_MODES", "make_exchange", "resolve_exchange", "sharding_mode"]
