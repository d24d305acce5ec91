"""Group commit for INSERTs: concurrent inserts into the same table become one engine insert.

Why: the engine's cost is per INSERT, not per row. Each insert into
`otel_traces` writes a wide part of ~126 files plus one part per materialized
view, and the many small parts are merged again in the background. The same
rows land several times faster in few large inserts than in many small ones
(see compose/README.md, "Ingest"). The collector sends one INSERT per OTLP
request (batching is off, see compose/README.md), so under load many
INSERTs into `otel.otel_traces` are in flight at once: this module commits
them together.

What a client sees: nothing changes. Each request is answered only after the
engine insert holding its rows has committed (or failed): nothing is
acknowledged and then lost. Its `X-ClickHouse-Summary` counts the rows of the
whole group commit it was part of.

How:
- only `INSERT ... FORMAT RowBinary` whose data arrived in the body is
  grouped (what rotel and the `clickhouse` crate send); every other query
  runs alone, exactly as before. Requests are grouped only with requests for
  the same database, table, column list and settings;
- one committer thread takes every waiting request of the oldest kind (up
  to `max_group_bytes`), concatenates their data files (RowBinary rows are
  self-delimiting: the concatenation is the union of the rows) and runs one
  `INSERT ... FROM INFILE` with `max_insert_block_size` above the group's
  size, so the table receives one block: a parse error anywhere fails the
  group before anything is written;
- when a group of several fails with an input error (malformed data in one
  request), each request is inserted again on its own, so only the request
  at fault gets the error; any other failure is answered to every request of
  the group, and the client retries;
- overload: when the data waiting to be committed exceeds
  `max_pending_bytes`, new inserts are refused at once with HTTP 503 and
  ClickHouse's TOO_MANY_SIMULTANEOUS_QUERIES (202), after their body was
  read, so collectors back off and retry; memory stays bounded because data
  waits in files, never in memory.

**Architecture Invariant:** this module imports nothing from chdb_http; the
server hands it a function that runs one insert.
"""

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

# ClickHouse error codes.
CODE_TOO_MANY_SIMULTANEOUS_QUERIES = 202

# Input-data errors: a group failing with one of these is retried request by
# request (nothing was written: the group is one block).
INPUT_ERROR_CODES = {
    6,  # CANNOT_PARSE_TEXT
    25,  # CANNOT_PARSE_ESCAPE_SEQUENCE
    26,  # CANNOT_PARSE_QUOTED_STRING
    27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  # ATTEMPT_TO_READ_AFTER_EOF
    33,  # CANNOT_READ_ALL_DATA
    38,  # CANNOT_PARSE_DATE
    41,  # CANNOT_PARSE_DATETIME
    53,  # TYPE_MISMATCH
    69,  # ARGUMENT_OUT_OF_BOUND
    72,  # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    376,  # CANNOT_PARSE_UUID
    441,  # CANNOT_PARSE_IPV4
    442,  # CANNOT_PARSE_IPV6
}

GROUPABLE_FORMATS = {"rowbinary"}

# rotel gives up on an insert after 5 s and sends it again: an insert must be
# answered well within that, so groups stay small enough to commit in about a
# second (16 MiB of RowBinary spans is ~60,000 rows), and no more than about
# three groups may wait.
DEFAULT_MAX_GROUP_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_PENDING_BYTES = 48 * 1024 * 1024
# Far above the rows of any group (a RowBinary row is at least one byte), so
# the group is parsed as one block. (chDB 26.9 was seen to write nothing of a
# 2.5-million-row RowBinary insert whose last row was truncated, even with the
# default block size; this makes it explicit.)
GROUP_BLOCK_ROWS = str(1 << 30)


class Busy(Exception):
    """The insert was refused because too much data is waiting; retry later."""

    code = CODE_TOO_MANY_SIMULTANEOUS_QUERIES

    def __init__(self, pending: int, limit: int):
        self.message = (
            f"Code: {self.code}. DB::Exception: chdb-http is busy: {pending} bytes of inserts are waiting "
            f"to be committed (limit {limit}); retry later. (TOO_MANY_SIMULTANEOUS_QUERIES)"
        )
        super().__init__(self.message)


@dataclass
class Insert:
    """One request's insert: what to run and where its data is."""

    key: Tuple  # requests with equal keys may share an engine insert
    data_path: str
    size: int
    # Builds the INSERT ... FROM INFILE for a data file.
    sql_for: Callable[[str], str]
    # Runs it: (sql, extra settings) -> result; raises on failure.
    run: Callable[[str, List[Tuple[str, str]]], object]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: Optional[BaseException] = None


@dataclass
class Stats:
    groups: int = 0
    requests: int = 0
    bytes: int = 0
    refused: int = 0
    largest_group: int = 0
    retried_alone: int = 0


class GroupCommitter:
    """Runs grouped inserts on one thread; `submit` blocks until committed."""

    def __init__(
        self,
        tmp_dir: str,
        log: Callable[[str], None],
        max_group_bytes: int = DEFAULT_MAX_GROUP_BYTES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ):
        self._tmp_dir = tmp_dir
        self._log = log
        self.max_group_bytes = max_group_bytes
        self.max_pending_bytes = max_pending_bytes
        self._cond = threading.Condition()
        self._queue: List[Insert] = []
        self._pending_bytes = 0
        self._closed = False
        self.stats = Stats()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    @staticmethod
    def groupable(insert_format: str, has_params: bool) -> bool:
        return insert_format.lower() in GROUPABLE_FORMATS and not has_params

    def submit(self, insert: Insert):
        """Queue `insert`, wait for its commit; its result, or raise its error."""
        with self._cond:
            if self._closed:
                raise RuntimeError("chdb-http is shutting down")
            # Always take one insert when nothing waits, however large.
            if self._pending_bytes and self._pending_bytes + insert.size > self.max_pending_bytes:
                self.stats.refused += 1
                raise Busy(self._pending_bytes, self.max_pending_bytes)
            self._queue.append(insert)
            self._pending_bytes += insert.size
            self._cond.notify_all()
        insert.done.wait()
        if insert.error is not None:
            raise insert.error
        return insert.result

    def close(self) -> None:
        """Commit what is queued, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def pending_bytes(self) -> int:
        with self._cond:
            return self._pending_bytes

    # -- the committer thread -------------------------------------------------

    def _take_group(self) -> List[Insert]:
        """The oldest waiting insert and every later one of the same kind that fits."""
        first = self._queue[0]
        group, rest, size = [], [], 0
        for insert in self._queue:
            if insert.key == first.key and (not group or size + insert.size <= self.max_group_bytes):
                group.append(insert)
                size += insert.size
            else:
                rest.append(insert)
        self._queue = rest
        return group

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                group = self._take_group()
            try:
                self._commit(group)
            finally:
                with self._cond:
                    self._pending_bytes -= sum(i.size for i in group)
                for insert in group:
                    insert.done.set()

    def _commit(self, group: List[Insert]) -> None:
        size = sum(i.size for i in group)
        self.stats.groups += 1
        self.stats.requests += len(group)
        self.stats.bytes += size
        self.stats.largest_group = max(self.stats.largest_group, len(group))
        if len(group) == 1:
            self._commit_alone(group[0])
            return
        fd, path = tempfile.mkstemp(prefix="group-", suffix=".data", dir=self._tmp_dir)
        try:
            with os.fdopen(fd, "wb") as out:
                for insert in group:
                    with open(insert.data_path, "rb") as data:
                        shutil.copyfileobj(data, out, 1024 * 1024)
            first = group[0]
            started = time.monotonic()
            try:
                result = first.run(first.sql_for(path), [("max_insert_block_size", GROUP_BLOCK_ROWS)])
            except Exception as error:  # noqa: BLE001 - the engine's error, answered below
                if getattr(error, "code", None) in INPUT_ERROR_CODES:
                    self._log(
                        f"Group insert of {len(group)} requests failed on its input; inserting them one by one"
                    )
                    self.stats.retried_alone += len(group)
                    for insert in group:
                        self._commit_alone(insert)
                    return
                for insert in group:
                    insert.error = error
                return
            elapsed_ms = (time.monotonic() - started) * 1000
            self._log(f"Group insert of {len(group)} requests, {size} bytes, in {elapsed_ms:.0f}ms")
            for insert in group:
                insert.result = result
        except Exception as error:  # noqa: BLE001 - e.g. the group file could not be written
            for insert in group:
                if insert.result is None and insert.error is None:
                    insert.error = error
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @staticmethod
    def _commit_alone(insert: Insert) -> None:
        try:
            insert.result = insert.run(insert.sql_for(insert.data_path), [])
        except Exception as error:  # noqa: BLE001 - answered to this request
            insert.error = error
