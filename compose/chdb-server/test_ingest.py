"""Tests of ingest.py, the group commit of chdb-http.

The engine is scripted here (a `run` function that records what it was asked
to insert), so each test can hold the committer busy and decide what fails.
The real engine behind it is covered by test_chdb_http.py (concurrent writers)
and by the conformance volume tests.
"""

import json
import os
import shutil
import sys
import tempfile
import threading
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ingest  # noqa: E402

DEADLINE_SECONDS = 10


class EngineError(Exception):
    def __init__(self, code):
        super().__init__(f"Code: {code}. DB::Exception: scripted")
        self.code = code


class ScriptedEngine:
    """Records each insert's data; the first insert waits until released."""

    def __init__(self, fail=None):
        self.inserts = []  # (data, extra settings)
        self.statements = []  # each insert's form, "INFILE" or "SELECT", also of failed ones
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail = fail or (lambda data: None)
        self.lock = threading.Lock()

    def run(self, sql, extra):
        self.statements.append(sql.split(" ", 2)[1])  # INFILE or SELECT (`insert` below)
        path = sql.rsplit(" ", 1)[1]
        with open(path, "rb") as f:
            data = f.read()
        self.started.set()
        if not self.release.wait(DEADLINE_SECONDS):
            raise AssertionError("the test never released the engine")
        with self.lock:
            self.inserts.append((data, extra))
        error = self.fail(data)
        if error is not None:
            raise error
        return f"inserted {len(data)} bytes"


class GroupCommitTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ingest-test-")
        self.log = []

    def tearDown(self):
        for name in os.listdir(self.tmp):
            os.unlink(os.path.join(self.tmp, name))
        os.rmdir(self.tmp)

    def committer(self, **kwargs):
        kwargs.setdefault("select_min_bytes", 0)  # the test data is tiny
        committer = ingest.GroupCommitter(self.tmp, self.log.append, **kwargs)
        self.addCleanup(committer.close)
        return committer

    def insert(self, engine, data: bytes, key=("otel", "INSERT INTO otel_traces", None, "RowBinary", ()), select=None):
        """`select`: the insert's INSERT ... SELECT FROM file() builder (none: FROM INFILE only)."""
        fd, path = tempfile.mkstemp(dir=self.tmp, prefix="req-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        insert = ingest.Insert(key, path, len(data), lambda p: f"INSERT INFILE {p}", engine.run)
        insert.select_sql_for = select
        return insert

    def submit_all(self, committer, inserts):
        """Submits each insert on its own thread; returns {index: result or error}."""
        outcomes = {}

        def submit(i, insert):
            try:
                outcomes[i] = committer.submit(insert)
            except Exception as error:  # noqa: BLE001 - recorded for the assertions
                outcomes[i] = error

        threads = [threading.Thread(target=submit, args=(i, x)) for i, x in enumerate(inserts)]
        for t in threads:
            t.start()
        return threads, outcomes

    def wait_queued(self, committer, size):
        deadline = threading.Event()
        for _ in range(DEADLINE_SECONDS * 100):
            if committer.pending_bytes() >= size:
                return
            deadline.wait(0.01)
        self.fail(f"{size} bytes never queued (pending {committer.pending_bytes()})")

    def test_concurrent_inserts_of_one_kind_become_one_engine_insert(self):
        engine = ScriptedEngine()
        committer = self.committer()
        first_threads, first = self.submit_all(committer, [self.insert(engine, b"first")])
        self.assertTrue(engine.started.wait(DEADLINE_SECONDS))
        # While the engine is busy with the first, three more arrive.
        rest = [self.insert(engine, d) for d in (b"-a", b"-b", b"-c")]
        threads, outcomes = self.submit_all(committer, rest)
        self.wait_queued(committer, len(b"first-a-b-c"))
        engine.release.set()
        for t in first_threads + threads:
            t.join(DEADLINE_SECONDS)
        self.assertEqual([d for d, _ in engine.inserts], [b"first", b"-a-b-c"])
        self.assertEqual(engine.inserts[1][1], [("max_insert_block_size", ingest.GROUP_BLOCK_ROWS)])
        self.assertEqual(first[0], "inserted 5 bytes")
        self.assertEqual(sorted(outcomes.values()), ["inserted 6 bytes"] * 3)
        self.assertEqual(committer.stats.largest_group, 3)

    def test_inserts_of_different_kinds_are_not_mixed(self):
        engine = ScriptedEngine()
        committer = self.committer()
        blocker, _ = self.submit_all(committer, [self.insert(engine, b"x")])
        self.assertTrue(engine.started.wait(DEADLINE_SECONDS))
        other_table = ("otel", "INSERT INTO otel_logs", None, "RowBinary", ())
        threads, outcomes = self.submit_all(
            committer, [self.insert(engine, b"t1"), self.insert(engine, b"l1", other_table), self.insert(engine, b"t2")]
        )
        self.wait_queued(committer, 7)
        engine.release.set()
        for t in blocker + threads:
            t.join(DEADLINE_SECONDS)
        self.assertEqual(sorted(d for d, _ in engine.inserts), [b"l1", b"t1t2", b"x"])

    def test_malformed_data_fails_only_its_own_request(self):
        engine = ScriptedEngine(fail=lambda data: EngineError(33) if b"bad" in data else None)
        committer = self.committer()
        blocker, _ = self.submit_all(committer, [self.insert(engine, b"x")])
        self.assertTrue(engine.started.wait(DEADLINE_SECONDS))
        threads, outcomes = self.submit_all(
            committer, [self.insert(engine, b"good1"), self.insert(engine, b"bad"), self.insert(engine, b"good2")]
        )
        self.wait_queued(committer, 14)
        engine.release.set()
        for t in blocker + threads:
            t.join(DEADLINE_SECONDS)
        self.assertEqual(outcomes[0], "inserted 5 bytes")
        self.assertIsInstance(outcomes[1], EngineError)
        self.assertEqual(outcomes[2], "inserted 5 bytes")
        # The group failed whole (one block), then each went alone.
        self.assertEqual([d for d, _ in engine.inserts][1:], [b"good1badgood2", b"good1", b"bad", b"good2"])

    def test_an_engine_failure_is_answered_to_every_request_of_the_group(self):
        engine = ScriptedEngine(fail=lambda data: EngineError(241) if data != b"x" else None)
        committer = self.committer()
        blocker, _ = self.submit_all(committer, [self.insert(engine, b"x")])
        self.assertTrue(engine.started.wait(DEADLINE_SECONDS))
        threads, outcomes = self.submit_all(committer, [self.insert(engine, b"a"), self.insert(engine, b"b")])
        self.wait_queued(committer, 3)
        engine.release.set()
        for t in blocker + threads:
            t.join(DEADLINE_SECONDS)
        self.assertEqual([type(o) for o in outcomes.values()], [EngineError, EngineError])
        self.assertEqual(len(engine.inserts), 2, "not retried one by one: memory errors are not input errors")

    def test_overload_is_refused_before_anything_is_queued(self):
        engine = ScriptedEngine()
        committer = self.committer(max_pending_bytes=10)
        blocker, _ = self.submit_all(committer, [self.insert(engine, b"12345678")])
        self.assertTrue(engine.started.wait(DEADLINE_SECONDS))
        threads, outcomes = self.submit_all(committer, [self.insert(engine, b"abc")])
        for t in threads:
            t.join(DEADLINE_SECONDS)
        self.assertIsInstance(outcomes[0], ingest.Busy)
        self.assertIn("TOO_MANY_SIMULTANEOUS_QUERIES", outcomes[0].message)
        self.assertEqual(committer.stats.refused, 1)
        engine.release.set()
        for t in blocker:
            t.join(DEADLINE_SECONDS)
        self.assertEqual([d for d, _ in engine.inserts], [b"12345678"])

    def test_close_commits_what_is_queued(self):
        engine = ScriptedEngine()
        engine.release.set()
        committer = ingest.GroupCommitter(self.tmp, self.log.append)
        threads, outcomes = self.submit_all(committer, [self.insert(engine, b"last")])
        for t in threads:
            t.join(DEADLINE_SECONDS)
        committer.close()
        self.assertEqual(outcomes[0], "inserted 4 bytes")

    @staticmethod
    def select(path):
        return f"INSERT SELECT {path}"

    def grouped(self, engine, committer, datas, select):
        """Holds the engine on a first insert while `datas` queue; returns their outcomes."""
        blocker, _ = self.submit_all(committer, [self.insert(engine, b"x", select=select)])
        self.assertTrue(engine.started.wait(DEADLINE_SECONDS))
        threads, outcomes = self.submit_all(committer, [self.insert(engine, d, select=select) for d in datas])
        self.wait_queued(committer, 1 + sum(len(d) for d in datas))
        engine.release.set()
        for t in blocker + threads:
            t.join(DEADLINE_SECONDS)
        return outcomes

    def test_a_group_is_inserted_with_select_from_file_as_one_block(self):
        engine = ScriptedEngine()
        committer = self.committer()
        outcomes = self.grouped(engine, committer, [b"-a", b"-b"], self.select)
        self.assertEqual(engine.inserts, [(b"x", ingest.GROUP_SELECT_SETTINGS), (b"-a-b", ingest.GROUP_SELECT_SETTINGS)])
        self.assertEqual(engine.statements, ["SELECT", "SELECT"])
        self.assertEqual(sorted(outcomes.values()), ["inserted 4 bytes"] * 2)
        self.assertEqual((committer.stats.selected, committer.stats.select_fallbacks), (2, 0))
        self.assertIn("(SELECT FROM file())", self.log[-1])

    def test_a_form_select_cannot_take_is_inserted_from_infile(self):
        engine = ScriptedEngine()
        committer = self.committer()
        self.grouped(engine, committer, [b"-a", b"-b"], lambda path: None)
        self.assertEqual(engine.statements, ["INFILE", "INFILE"])
        self.assertEqual(engine.inserts[1], (b"-a-b", [("max_insert_block_size", ingest.GROUP_BLOCK_ROWS)]))
        self.assertEqual((committer.stats.selected, committer.stats.select_fallbacks), (0, 0))

    def test_select_failing_for_another_reason_than_the_data_falls_back_to_infile(self):
        # e.g. a column type file() cannot read: the same rows go FROM INFILE, once.
        engine = ScriptedEngine()
        engine.fail = lambda data: EngineError(50) if engine.statements[-1] == "SELECT" else None
        committer = self.committer()
        outcomes = self.grouped(engine, committer, [b"-a", b"-b"], self.select)
        self.assertEqual(engine.statements, ["SELECT", "INFILE", "SELECT", "INFILE"])
        self.assertEqual(sorted(outcomes.values()), ["inserted 4 bytes"] * 2)
        self.assertEqual(committer.stats.select_fallbacks, 2)
        self.assertTrue(any("running the group FROM INFILE" in line for line in self.log), self.log)

    def test_bad_data_in_a_selected_group_fails_only_its_own_request(self):
        engine = ScriptedEngine(fail=lambda data: EngineError(33) if b"bad" in data else None)
        committer = self.committer()
        outcomes = self.grouped(engine, committer, [b"good1", b"bad", b"good2"], self.select)
        self.assertEqual(outcomes[0], "inserted 5 bytes")
        self.assertIsInstance(outcomes[1], EngineError)
        self.assertEqual(outcomes[2], "inserted 5 bytes")
        # Nothing of the failed group was written (one block); then one by one FROM INFILE.
        self.assertEqual([d for d, _ in engine.inserts][1:], [b"good1badgood2", b"good1", b"bad", b"good2"])
        self.assertEqual(engine.statements[1:], ["SELECT", "INFILE", "INFILE", "INFILE"])

    def test_a_small_group_is_inserted_from_infile(self):
        engine = ScriptedEngine()
        committer = self.committer(select_min_bytes=5)
        self.grouped(engine, committer, [b"-a", b"-b"], self.select)
        # "x" (1 byte) alone, then "-a-b" (4 bytes): both under 5 bytes.
        self.assertEqual(engine.statements, ["INFILE", "INFILE"])
        self.assertEqual(committer.stats.selected, 0)

    def test_an_insert_larger_than_a_group_is_inserted_alone_from_infile(self):
        engine = ScriptedEngine()
        engine.release.set()
        committer = self.committer(max_group_bytes=4)
        threads, outcomes = self.submit_all(committer, [self.insert(engine, b"123456", select=self.select)])
        for t in threads:
            t.join(DEADLINE_SECONDS)
        self.assertEqual(outcomes[0], "inserted 6 bytes")
        # In the engine's usual blocks (no extra settings): memory stays bounded.
        self.assertEqual(engine.inserts, [(b"123456", [])])
        self.assertEqual(engine.statements, ["INFILE"])

    def test_only_rowbinary_without_parameters_is_grouped(self):
        self.assertTrue(ingest.GroupCommitter.groupable("RowBinary", False))
        self.assertFalse(ingest.GroupCommitter.groupable("RowBinary", True))
        self.assertFalse(ingest.GroupCommitter.groupable("JSONEachRow", False))
        self.assertFalse(ingest.GroupCommitter.groupable("RowBinaryWithNamesAndTypes", False))



class SpoolTest(unittest.TestCase):
    """Durable acknowledgement: answered once on disk, committed later, never lost."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ingest-spool-test-")
        self.spool = os.path.join(self.tmp, "spool")
        self.log = []
        # Cleanups run last first: this one after every committer is closed.
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def committer(self, **kwargs):
        kwargs.setdefault("linger_seconds", 0.05)
        committer = ingest.GroupCommitter(self.tmp, self.log.append, spool_dir=self.spool, **kwargs)
        self.addCleanup(committer.close)
        return committer

    def spool_one(self, committer, engine, data: bytes):
        fd, path = tempfile.mkstemp(dir=self.tmp, prefix="req-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        key = ("otel", "INSERT INTO otel_traces", None, "RowBinary", ())
        insert = ingest.Insert(key, path, len(data), lambda p: f"INSERT FROM INFILE {p}", engine.run)
        committer.spool(insert, {"table": "otel_traces"})
        os.unlink(path)  # the request's own copy goes; the spool keeps the data

    def spooled_files(self):
        return sorted(n for n in os.listdir(self.spool) if n != "rejected")

    def wait_until(self, predicate, what):
        pause = threading.Event()
        for _ in range(DEADLINE_SECONDS * 100):
            if predicate():
                return
            pause.wait(0.01)
        self.fail(f"timed out waiting for {what}")

    def test_spooled_inserts_are_on_disk_when_answered_and_gone_once_committed(self):
        engine = ScriptedEngine()
        committer = self.committer(linger_seconds=5)
        for data in (b"a1", b"a2", b"a3"):
            self.spool_one(committer, engine, data)
        # Answered: all three are on disk, data and record, nothing inserted yet.
        self.assertEqual(len(self.spooled_files()), 6)
        self.assertEqual(engine.inserts, [])
        engine.release.set()
        committer.close()  # stops lingering, commits
        self.assertEqual([d for d, _ in engine.inserts], [b"a1a2a3"])
        self.assertEqual(self.spooled_files(), [])

    def test_a_restarted_server_commits_what_the_spool_holds(self):
        engine = ScriptedEngine()
        first = ingest.GroupCommitter(self.tmp, self.log.append, spool_dir=self.spool, linger_seconds=60)
        self.spool_one(first, engine, b"kept")
        # The process dies before committing: simulated by never releasing
        # the committer thread (a daemon) and starting another on the spool.
        engine2 = ScriptedEngine()
        engine2.release.set()
        second = self.committer()

        def make_insert(record, path, size):
            self.assertEqual(record, {"table": "otel_traces"})
            return ingest.Insert(("k",), path, size, lambda p: f"INSERT FROM INFILE {p}", engine2.run)

        self.assertEqual(second.recover(make_insert), 1)
        self.wait_until(lambda: engine2.inserts, "the recovered insert")
        self.assertEqual([d for d, _ in engine2.inserts], [b"kept"])
        self.wait_until(lambda: self.spooled_files() == [], "the spool to empty")

    def test_data_the_engine_refuses_is_kept_in_rejected_and_logged(self):
        engine = ScriptedEngine(fail=lambda data: EngineError(33) if b"bad" in data else None)
        engine.release.set()
        committer = self.committer()
        self.spool_one(committer, engine, b"good")
        self.spool_one(committer, engine, b"bad")
        committer.close()
        self.assertIn(b"good", [d for d, _ in engine.inserts])
        self.assertEqual(self.spooled_files(), [])
        self.assertEqual(len(os.listdir(os.path.join(self.spool, "rejected"))), 2)
        self.assertEqual(committer.stats.rejected, 1)
        self.assertTrue(any(line.startswith("ERROR: dropped an acknowledged insert of 3 bytes") for line in self.log))

    def test_other_failures_are_retried_until_they_commit(self):
        failures = [EngineError(241), EngineError(241)]
        engine = ScriptedEngine(fail=lambda data: failures.pop() if failures else None)
        engine.release.set()
        committer = self.committer()
        self.spool_one(committer, engine, b"x")
        self.wait_until(lambda: len(engine.inserts) == 3, "two retries")
        self.wait_until(lambda: self.spooled_files() == [], "the spool to empty")
        self.assertEqual(committer.stats.rejected, 0)

    def test_a_full_spool_slows_inserts_down_and_never_refuses_them(self):
        engine = ScriptedEngine()
        committer = self.committer(max_spooled_bytes=4, linger_seconds=0, spool_wait_seconds=DEADLINE_SECONDS)
        self.spool_one(committer, engine, b"1234")
        self.assertTrue(engine.started.wait(DEADLINE_SECONDS))
        # The spool is full: the next insert waits for the committer to make room.
        threads = [threading.Thread(target=self.spool_one, args=(committer, engine, b"5"))]
        threads[0].start()
        threads[0].join(0.2)
        self.assertTrue(threads[0].is_alive(), "answered while the spool was full")
        engine.release.set()
        threads[0].join(DEADLINE_SECONDS)
        self.assertFalse(threads[0].is_alive())
        committer.close()
        self.assertEqual([d for d, _ in engine.inserts], [b"1234", b"5"])
        self.assertEqual(committer.stats.over_limit, 0)

    def test_past_its_wait_an_insert_is_spooled_over_the_limit(self):
        engine = ScriptedEngine()
        committer = self.committer(max_spooled_bytes=4, linger_seconds=60, spool_wait_seconds=0.05)
        self.spool_one(committer, engine, b"1234")
        self.spool_one(committer, engine, b"5")  # waits 50 ms, then goes in anyway
        self.assertEqual(committer.stats.over_limit, 1)
        engine.release.set()
        committer.close()
        self.assertEqual([d for d, _ in engine.inserts], [b"12345"])

    def test_an_empty_insert_is_counted_and_logged(self):
        engine = ScriptedEngine()
        engine.release.set()
        committer = self.committer()
        self.spool_one(committer, engine, b"")
        committer.close()
        self.assertEqual(committer.stats.empty, 1)
        self.assertTrue(any("without data" in line for line in self.log))



class ServerSpoolTest(unittest.TestCase):
    """chdb_http.py with a spool and the real engine: acknowledged early, stored, recovered after a restart."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ingest-server-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.spool = os.path.join(self.tmp, "spool")
        self.data = os.path.join(self.tmp, "data")

    def start(self):
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "CHDB_HTTP_PASSWORD"}
        stderr = open(os.path.join(self.tmp, "server.log"), "ab")
        self.addCleanup(stderr.close)
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "chdb_http.py"), "--listen", "127.0.0.1:0", "--data", self.data,
             "--insert-spool", self.spool, "--wait-for-async-insert", "0"],
            stdout=subprocess.PIPE, stderr=stderr, env=env,
        )
        self.addCleanup(self.stop, proc)
        line = proc.stdout.readline().decode()
        self.assertTrue(line.startswith("chdb-http listening on http://"), line)
        return int(line.rsplit(":", 1)[1]), proc

    @staticmethod
    def stop(proc):
        if proc.poll() is None:
            proc.terminate()
            proc.wait(DEADLINE_SECONDS * 3)
        proc.stdout.close()

    def post(self, port, query, body=b""):
        import http.client
        import urllib.parse

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS * 3)
        try:
            connection.request("POST", "/?" + urllib.parse.urlencode(query), body=body)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def count(self, port):
        for _ in range(DEADLINE_SECONDS * 20):
            status, text = self.post(port, {"query": "SELECT count() FROM t.x"})
            self.assertEqual(status, 200, text)
            if text.strip() != "0":
                return int(text)
            threading.Event().wait(0.05)
        return 0

    @staticmethod
    def row(a: int, b: str) -> bytes:
        return a.to_bytes(8, "little") + bytes([len(b)]) + b.encode()

    def test_an_async_insert_is_answered_then_stored(self):
        port, _ = self.start()
        for sql in ("CREATE DATABASE t", "CREATE TABLE t.x (a UInt64, b String) ENGINE = MergeTree ORDER BY a"):
            self.assertEqual(self.post(port, {"query": sql})[0], 200)
        status, text = self.post(
            port, {"query": "INSERT INTO t.x (a, b) FORMAT RowBinary", "async_insert": "1"}, self.row(1, "one")
        )
        self.assertEqual(status, 200, text)
        self.assertEqual(self.count(port), 1)

    def test_a_restarted_server_commits_what_its_spool_holds(self):
        port, first = self.start()
        for sql in ("CREATE DATABASE t", "CREATE TABLE t.x (a UInt64, b String) ENGINE = MergeTree ORDER BY a"):
            self.assertEqual(self.post(port, {"query": sql})[0], 200)
        self.stop(first)
        # What a server that died after answering leaves behind.
        name = "00000000000000000001-1-00000000"
        with open(os.path.join(self.spool, name + ".rowbinary"), "wb") as f:
            f.write(self.row(7, "seven") + self.row(8, "eight"))
        with open(os.path.join(self.spool, name + ".json"), "w") as f:
            json.dump(
                {
                    "database": "default",
                    "settings": [],
                    "template": f"INSERT INTO t.x (a, b) FROM INFILE '{ingest.PATH_MARKER}' FORMAT RowBinary",
                },
                f,
            )
        port, _ = self.start()
        self.assertEqual(self.count(port), 2)
        self.assertEqual([n for n in os.listdir(self.spool) if n != "rejected"], [])


if __name__ == "__main__":
    unittest.main()
