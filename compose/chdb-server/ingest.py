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
  `INSERT INTO t (cols) SELECT * FROM file('<group>', RowBinary, '<the
  columns' types without LowCardinality>')` with the insert's block
  thresholds above the group's size, so the table receives one block, written
  once the whole file was parsed: a parse error anywhere fails the group
  before anything is written. chDB 26.9 parses RowBinary into LowCardinality
  columns row by row, most of an insert's cost; parsed as the plain types and
  converted a column at a time, the same rows land with less than half the CPU
  (compose/README.md, "Log records"). Inserts without a column list, and a
  group whose SELECT form fails for another reason than its data, run as
  `INSERT ... FROM INFILE` with `max_insert_block_size` above the group's
  size, as before; so do groups under `select_min_bytes` (1 MiB), and a
  single request larger than a group (in the engine's usual blocks: bounded
  memory);
- when a group of several fails with an input error (malformed data in one
  request), each request is inserted again on its own, so only the request
  at fault gets the error; any other failure is answered to every request of
  the group, and the client retries;
- overload: when the data waiting to be committed exceeds
  `max_pending_bytes`, new inserts are refused at once with HTTP 503 and
  ClickHouse's TOO_MANY_SIMULTANEOUS_QUERIES (202), after their body was
  read, so collectors back off and retry; memory stays bounded because data
  waits in files, never in memory.

Durable acknowledgement (`spool`): ClickHouse's asynchronous inserts with
`wait_for_async_insert=0` are answered before they are flushed, and lost if
the server dies first. Here such an insert is answered once its data and
what to run are in the spool directory and fsynced; the committer inserts it
with later ones (waiting up to `linger_seconds` for more, so groups grow past
what concurrent requests alone give, up to `max_spooled_group_bytes`: these
were answered already, so their commit may take longer than 5 s), then
deletes the files. A server
started on a spool with files left in it commits them first (`recover`). A
crash between an engine commit and the deletion of its files replays that
group once (at least once, never zero times). Spooled data the engine
refuses as malformed cannot be answered any more: it is moved to
`<spool>/rejected/` and logged as an error with its size; any other failure
is retried after a pause.

Overload of the spool is never refused: rotel 0.0.1a15 retries a failed
insert with an EMPTY body (its payload's clones share one queue of chunks,
which the first attempt consumed), so a 503 or a timeout would lose the
rows. Instead, while more than `max_spooled_bytes` are spooled, a new insert
waits (up to `spool_wait_seconds`, well within rotel's 5 s timeout) for the
committer to make room: the collector's 10 requests in flight slow down, its
queue fills, and its receivers stop answering senders until there is room.
After that wait it is spooled anyway (counted in `stats.over_limit`): the
spool is on disk, so memory stays bounded either way.

**Architecture Invariant:** this module imports nothing from chdb_http; the
server hands it a function that runs one insert.
"""

import json

import itertools
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
DEFAULT_MAX_SPOOLED_BYTES = 256 * 1024 * 1024
# Spooled inserts were answered already: their groups may take longer.
DEFAULT_MAX_SPOOLED_GROUP_BYTES = 64 * 1024 * 1024
DEFAULT_LINGER_SECONDS = 0.2
DEFAULT_SPOOL_WAIT_SECONDS = 2.5
# Where a spooled insert's data file goes in its INSERT ... FROM INFILE text.
PATH_MARKER = "@@chdb-http-spooled-data@@"
RETRY_PAUSE_SECONDS = 1.0

# Far above the rows of any group (a RowBinary row is at least one byte), so
# the group is parsed as one block. (chDB 26.9 was seen to write nothing of a
# 2.5-million-row RowBinary insert whose last row was truncated, even with the
# default block size; this makes it explicit.)
GROUP_BLOCK_ROWS = str(1 << 30)
# Smaller groups run FROM INFILE: the SELECT form's column lookup and extra
# settings cost a few engine calls, more than the parsing it saves on a
# few thousand rows.
DEFAULT_SELECT_MIN_BYTES = 1024 * 1024
# GROUP_BLOCK_ROWS for INSERT ... SELECT: the rows are squashed into one
# block, written only once the whole file was parsed.
GROUP_SELECT_SETTINGS = [
    ("min_insert_block_size_rows", GROUP_BLOCK_ROWS),
    ("min_insert_block_size_bytes", str(1 << 50)),
]


def name_os_thread(name: str) -> None:
    """Names the calling thread for the OS (`/proc/<pid>/task/<tid>/comm`, at
    most 15 bytes), so `cargo xtask bench ingest` can tell chdb-http's own
    threads from the engine's in its CPU split. Best effort (Linux only)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass


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
    # Builds the faster INSERT ... SELECT FROM file() for a group's data file,
    # or None where that form does not apply (see `_commit`); may query the engine.
    select_sql_for: Optional[Callable[[str], Optional[str]]] = None
    # Answered already; its data is in the spool (data_path), plus `.json`.
    durable: bool = False
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class Stats:
    groups: int = 0
    requests: int = 0
    bytes: int = 0
    refused: int = 0
    largest_group: int = 0
    retried_alone: int = 0
    spooled: int = 0
    rejected: int = 0
    over_limit: int = 0
    empty: int = 0
    # Groups committed as INSERT ... SELECT FROM file(); and those whose
    # attempt failed for another reason than their data, then ran FROM INFILE.
    selected: int = 0
    select_fallbacks: int = 0


class GroupCommitter:
    """Runs grouped inserts on one thread; `submit` blocks until committed."""

    def __init__(
        self,
        tmp_dir: str,
        log: Callable[[str], None],
        max_group_bytes: int = DEFAULT_MAX_GROUP_BYTES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        spool_dir: Optional[str] = None,
        max_spooled_bytes: int = DEFAULT_MAX_SPOOLED_BYTES,
        linger_seconds: float = DEFAULT_LINGER_SECONDS,
        max_spooled_group_bytes: int = DEFAULT_MAX_SPOOLED_GROUP_BYTES,
        spool_wait_seconds: float = DEFAULT_SPOOL_WAIT_SECONDS,
        select_min_bytes: int = DEFAULT_SELECT_MIN_BYTES,
    ):
        self._tmp_dir = tmp_dir
        self._log = log
        self.max_group_bytes = max_group_bytes
        self.max_pending_bytes = max_pending_bytes
        self.spool_dir = spool_dir
        self.max_spooled_bytes = max_spooled_bytes
        self.linger_seconds = linger_seconds
        self.max_spooled_group_bytes = max_spooled_group_bytes
        self.spool_wait_seconds = spool_wait_seconds
        self.select_min_bytes = select_min_bytes
        if spool_dir is not None:
            os.makedirs(os.path.join(spool_dir, "rejected"), exist_ok=True)
        self._names = itertools.count()
        self._cond = threading.Condition()
        self._queue: List[Insert] = []
        self._pending_bytes = 0
        self._spooled_bytes = 0
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

    def spool(self, insert: Insert, record: dict) -> None:
        """Make `insert` durable in the spool and queue it; returns once it is on disk.

        `record` (JSON) is what `recover` needs to rebuild the insert after a
        restart; the data file is linked (or copied) into the spool, so the
        caller may delete its own copy.
        """
        if insert.size == 0:
            self.stats.empty += 1
            self._log(
                "WARNING: an asynchronous INSERT arrived without data (rotel 0.0.1a15 retries with an empty body: "
                "the rows of the first attempt are lost)"
            )
        with self._cond:
            deadline = time.monotonic() + self.spool_wait_seconds
            while self._spooled_bytes and self._spooled_bytes + insert.size > self.max_spooled_bytes:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    self.stats.over_limit += 1
                    break
                self._cond.wait(remaining)
            if self._closed:
                raise RuntimeError("chdb-http is shutting down")
            self._spooled_bytes += insert.size
            name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._names):08d}"
        try:
            insert.data_path = self._write_spool(name, insert.data_path, record)
        except BaseException:
            with self._cond:
                self._spooled_bytes -= insert.size
            raise
        insert.durable = True
        insert.queued_at = time.monotonic()
        with self._cond:
            self._queue.append(insert)
            self.stats.spooled += 1
            self._cond.notify_all()

    def _write_spool(self, name: str, data_path: str, record: dict) -> str:
        target = os.path.join(self.spool_dir, name + ".rowbinary")
        try:
            os.link(data_path, target)
        except OSError:
            shutil.copyfile(data_path, target)
        meta = os.path.join(self.spool_dir, name + ".json")
        with open(meta + ".tmp", "w") as f:
            f.write(json.dumps(record))  # one write (json.dump writes piece by piece)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(meta + ".tmp", meta)  # the .json appears last: it marks a complete entry
        dir_fd = os.open(self.spool_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return target

    def recover(self, make_insert: Callable[[dict, str, int], Insert]) -> int:
        """Queue the inserts a previous server left in the spool; returns how many."""
        if self.spool_dir is None:
            return 0
        names = sorted(n[: -len(".json")] for n in os.listdir(self.spool_dir) if n.endswith(".json"))
        for name in names:
            data = os.path.join(self.spool_dir, name + ".rowbinary")
            with open(os.path.join(self.spool_dir, name + ".json")) as f:
                record = json.load(f)
            insert = make_insert(record, data, os.path.getsize(data))
            insert.durable = True
            with self._cond:
                self._queue.append(insert)
                self._spooled_bytes += insert.size
                self._cond.notify_all()
        for leftover in os.listdir(self.spool_dir):
            if leftover.endswith(".tmp") or (
                leftover.endswith(".rowbinary") and leftover[: -len(".rowbinary")] not in names
            ):
                os.unlink(os.path.join(self.spool_dir, leftover))  # never acknowledged
        if names:
            self._log(f"Recovered {len(names)} acknowledged inserts from the spool {self.spool_dir}")
        return len(names)

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
        limit = self._group_limit(first)
        group, rest, size = [], [], 0
        for insert in self._queue:
            if insert.key == first.key and (not group or size + insert.size <= limit):
                group.append(insert)
                size += insert.size
            else:
                rest.append(insert)
        self._queue = rest
        return group

    def _group_limit(self, first: Insert) -> int:
        return self.max_spooled_group_bytes if first.durable else self.max_group_bytes

    def _linger(self) -> float:
        """Seconds to wait for more before committing a spooled head of the queue (0: go)."""
        first = self._queue[0]
        if not first.durable or self._closed:
            return 0.0
        queued = sum(i.size for i in self._queue if i.key == first.key)
        if queued >= self._group_limit(first):
            return 0.0
        return max(0.0, first.queued_at + self.linger_seconds - time.monotonic())

    def _run(self) -> None:
        name_os_thread("chdb-commit")
        while True:
            with self._cond:
                while True:
                    if not self._queue:
                        if self._closed:
                            return
                        self._cond.wait()
                        continue
                    wait = self._linger()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                group = self._take_group()
            retry = []
            try:
                retry = self._commit(group) or []
            finally:
                again = {id(i) for i in retry}
                with self._cond:
                    self._pending_bytes -= sum(i.size for i in group if not i.durable)
                    self._spooled_bytes -= sum(i.size for i in group if i.durable and id(i) not in again)
                    self._queue[:0] = retry
                    self._cond.notify_all()  # spool() may wait for room
                for insert in group:
                    if not insert.durable:
                        insert.done.set()
                    elif id(insert) not in again:
                        self._settle_spooled(insert)
            if retry:
                self._log(f"Will retry {len(retry)} acknowledged inserts in {RETRY_PAUSE_SECONDS:.0f}s")
                time.sleep(RETRY_PAUSE_SECONDS)

    def _settle_spooled(self, insert: Insert) -> None:
        """A spooled insert is done: delete it, or keep it in rejected/ if the engine refused its data."""
        base = insert.data_path[: -len(".rowbinary")]
        if insert.error is None:
            for path in (insert.data_path, base + ".json"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            return
        self.stats.rejected += 1
        rejected = os.path.join(self.spool_dir, "rejected")
        for path in (insert.data_path, base + ".json"):
            try:
                os.rename(path, os.path.join(rejected, os.path.basename(path)))
            except FileNotFoundError:
                pass
        self._log(
            f"ERROR: dropped an acknowledged insert of {insert.size} bytes, the engine refused its data: "
            f"{str(insert.error).strip()[:300]} (kept in {rejected})"
        )

    def _commit(self, group: List[Insert]) -> None:
        size = sum(i.size for i in group)
        self.stats.groups += 1
        self.stats.requests += len(group)
        self.stats.bytes += size
        self.stats.largest_group = max(self.stats.largest_group, len(group))
        if len(group) == 1 and size > self._group_limit(group[0]):
            # Larger than a group may be: inserted in the engine's usual blocks
            # (bounded memory), as ClickHouse inserts it.
            self._commit_alone(group[0])
            return self._retry_later(group)
        path = None
        try:
            if len(group) == 1:
                data_path = group[0].data_path
            else:
                fd, path = tempfile.mkstemp(prefix="group-", suffix=".data", dir=self._tmp_dir)
                with os.fdopen(fd, "wb") as out:
                    for insert in group:
                        with open(insert.data_path, "rb") as data:
                            shutil.copyfileobj(data, out, 1024 * 1024)
                data_path = path
            first = group[0]
            started = time.monotonic()
            how = "SELECT FROM file()"
            try:
                result = self._run_select(first, data_path) if size >= self.select_min_bytes else None
                if result is None:
                    if len(group) == 1:
                        self._commit_alone(first)
                        return self._retry_later(group)
                    how = "FROM INFILE"
                    result = first.run(first.sql_for(data_path), [("max_insert_block_size", GROUP_BLOCK_ROWS)])
            except Exception as error:  # noqa: BLE001 - the engine's error, answered below
                if getattr(error, "code", None) in INPUT_ERROR_CODES:
                    if len(group) > 1:
                        self._log(
                            f"Group insert of {len(group)} requests failed on its input; inserting them one by one"
                        )
                        self.stats.retried_alone += len(group)
                    # One by one FROM INFILE: each request at fault gets the engine's own error for it.
                    for insert in group:
                        self._commit_alone(insert)
                    return self._retry_later(group)
                for insert in group:
                    insert.error = error
                return self._retry_later(group)
            elapsed_ms = (time.monotonic() - started) * 1000
            self._log(f"Group insert of {len(group)} requests, {size} bytes, in {elapsed_ms:.0f}ms ({how})")
            for insert in group:
                insert.result = result
        except Exception as error:  # noqa: BLE001 - e.g. the group file could not be written
            for insert in group:
                if insert.result is None and insert.error is None:
                    insert.error = error
            return self._retry_later(group)
        finally:
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _run_select(self, first: Insert, data_path: str):
        """The group as one INSERT ... SELECT FROM file(): its result, or None
        when that form does not apply or failed for another reason than the
        data (then the caller runs it FROM INFILE, as every insert ran before).
        An input error is raised: the data is at fault, not the form."""
        if first.select_sql_for is None:
            return None
        try:
            sql = first.select_sql_for(data_path)
            if sql is None:
                return None
            result = first.run(sql, GROUP_SELECT_SETTINGS)
        except Exception as error:  # noqa: BLE001 - logged, then FROM INFILE
            if getattr(error, "code", None) in INPUT_ERROR_CODES:
                raise
            self.stats.select_fallbacks += 1
            self._log(f"INSERT ... SELECT FROM file() failed, running the group FROM INFILE: {str(error).strip()[:300]}")
            return None
        self.stats.selected += 1
        return result

    @staticmethod
    def _retry_later(group: List[Insert]) -> List[Insert]:
        """Spooled inserts that failed for another reason than their data: kept for another try."""
        retry = []
        for insert in group:
            if (
                insert.durable
                and insert.error is not None
                and getattr(insert.error, "code", None) not in INPUT_ERROR_CODES
                and os.path.exists(insert.data_path)  # gone: nothing left to retry
            ):
                insert.error = None
                retry.append(insert)
        return retry

    @staticmethod
    def _commit_alone(insert: Insert) -> None:
        try:
            insert.result = insert.run(insert.sql_for(insert.data_path), [])
        except Exception as error:  # noqa: BLE001 - answered to this request
            insert.error = error
