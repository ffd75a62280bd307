"""SQLite store: one file, shared by every worker process, one transaction per step.

A step runs inside `BEGIN IMMEDIATE`, which takes SQLite's write lock up front: the check and the
take of an admission are one atomic step across all processes sharing the file. While the lock is
free a step runs on the event loop itself (a fraction of a millisecond); when another process
holds it, on one dedicated thread per process, so the event loop never waits on a lock, and the
maintenance (expired rows deleted in small chunks, then a WAL checkpoint, which writes and syncs
the database file) runs on that thread too. The window algorithm is the one in
`quotagate.limiter`; each counter's state is a small JSON document in its row.
"""

from .sqlite_counters import SQLiteCounters
from .sqlite_db import path_from_url
from .sqlite_index import SQLiteUsageIndex
from .sqlite_keys import SQLiteKeys

__all__ = ["SQLiteStore", "path_from_url"]


class SQLiteStore(SQLiteCounters, SQLiteKeys, SQLiteUsageIndex):
    """`Store` over one SQLite file: the three contracts on one shared connection and store thread
    (`SQLiteDB`)."""
