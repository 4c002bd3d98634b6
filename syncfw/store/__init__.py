"""The SQLite store: replicated log, version vector, pending and rejected ops,
materialized CRDT state, peers' acknowledgements, compaction.

Owns: every SQL statement of syncfw: the pure apply planner (``planner``),
local batches (``local``), the writer queue with priorities (``writer``),
reads and export (``export``), the lossy live view (``feed``), the resumable
change feed (``follow``), metrics after commit (``meter``). May import: the pure core (clock, crdt,
log, zones, errors), aiosqlite, msgpack. Knows nothing of sync sessions,
transports or gRPC.
"""

from syncfw.errors import ChangeFeedLagged
from syncfw.store.feed import Change, ChangeFeed
from syncfw.store.follow import FeedItem, Follow
from syncfw.store.schema import APPLICATION_ID, SCHEMA_VERSION
from syncfw.store.store import Store, StoreConfig, StoreStats

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "Change",
    "ChangeFeed",
    "ChangeFeedLagged",
    "FeedItem",
    "Follow",
    "Store",
    "StoreConfig",
    "StoreStats",
]
