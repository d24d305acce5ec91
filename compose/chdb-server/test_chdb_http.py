"""Tests of chdb_http.py and of the schema in compose/sql/.

Run from the repository root with the project's virtual environment:

    .venv/bin/python -m unittest discover -s compose/chdb-server -v

Every server test class starts `chdb_http.py` as a subprocess on port 0, with a
fresh data directory and a password, and stops it when the class is done
(also when it fails). `SchemaAndCollectorTest` also starts the real collector
(rotel-agent from the rotel wheel) and sends it OTLP/HTTP JSON: the proof that
server, schema and collector work together. Nothing sleeps to synchronise:
every wait polls with a deadline.
"""

import base64
import glob
import http.client
import importlib.util
import json
import os
import random
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "chdb_http.py")
SQL_DIR = os.path.join(os.path.dirname(HERE), "sql")
PASSWORD = "t3st-secret-pw"
STARTUP_DEADLINE_SECONDS = 30
ROTEL_DEADLINE_SECONDS = 15

sys.path.insert(0, HERE)
import chdb_http  # noqa: E402 - the lexer is tested directly


def rotel_agent_path():
    spec = importlib.util.find_spec("rotel")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "rotel-agent")
    return path if os.access(path, os.X_OK) else None


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(predicate, deadline_seconds, interval=0.05, what="condition"):
    """Call `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + deadline_seconds
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_seconds}s waiting for {what}; last value {last!r}")
        time.sleep(interval)


# ---------------------------------------------------------------------------
# The server under test.


class ServerProcess:
    def __init__(self, data_dir, password=PASSWORD):
        self.data_dir = data_dir
        self.password = password
        self.proc = None
        self.url = None
        self.port = None
        self.stderr_path = os.path.join(os.path.dirname(data_dir), f"server-{os.getpid()}-{id(self)}.stderr")

    def start(self):
        env = dict(os.environ)
        env.pop(chdb_http.PASSWORD_ENV, None)
        if self.password is not None:
            env[chdb_http.PASSWORD_ENV] = self.password
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, "--listen", "127.0.0.1:0", "--data", self.data_dir],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        line = self._read_stdout_line(STARTUP_DEADLINE_SECONDS)
        prefix = "chdb-http listening on http://"
        if not line.startswith(prefix):
            self.stop()
            raise AssertionError(f"unexpected first stdout line {line!r}; stderr: {self.stderr_text()[-2000:]}")
        self.url = line[len("chdb-http listening on "):].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def _read_stdout_line(self, deadline_seconds):
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + deadline_seconds
        buffer = b""
        try:
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"server did not print its listening line; stderr: {self.stderr_text()[-2000:]}")
                if not selector.select(timeout=remaining):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(
                        f"server exited with {self.proc.wait(5)} before listening; stderr: {self.stderr_text()[-2000:]}"
                    )
                buffer += chunk
        finally:
            selector.close()
        return buffer.split(b"\n", 1)[0].decode()

    def stop(self):
        """SIGTERM, then wait; returns the exit code (kills after a deadline)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._stderr.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    # -- HTTP --------------------------------------------------------------

    def request(self, method, query_string="", body=None, headers=None, auth="headers", path="/", chunks=None):
        """One request on a fresh connection; returns (status, headers, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            return self.request_on(connection, method, query_string, body, headers, auth, path, chunks)
        finally:
            connection.close()

    def request_on(self, connection, method, query_string="", body=None, headers=None, auth="headers", path="/", chunks=None):
        all_headers = dict(headers or {})
        if auth == "headers":
            all_headers.update({"X-ClickHouse-User": "default", "X-ClickHouse-Key": self.password or ""})
        elif auth == "basic":
            token = base64.b64encode(f"default:{self.password}".encode()).decode()
            all_headers["Authorization"] = f"Basic {token}"
        target = path + (("?" + query_string) if query_string else "")
        if chunks is not None:
            all_headers["Transfer-Encoding"] = "chunked"
            connection.request(method, target, body=iter(chunks), headers=all_headers, encode_chunked=True)
        else:
            if isinstance(body, str):
                body = body.encode()
            connection.request(method, target, body=body, headers=all_headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()

    def query(self, sql, **params):
        """POST `sql` in the body; returns the body text, fails the test on an error."""
        status, headers, body = self.request("POST", urllib.parse.urlencode(params), body=sql)
        if status != 200:
            raise AssertionError(f"query failed with {status}: {body.decode(errors='replace')}\nquery: {sql}")
        return body.decode()

    def apply_schema(self):
        """Apply compose/sql/*.sql the way the Rust harness does it."""
        for path in sorted(glob.glob(os.path.join(SQL_DIR, "*.sql"))):
            with open(path, encoding="utf-8") as handle:
                statements = split_statements(handle.read())
            for statement in statements:
                self.query(statement)


def split_statements(text):
    """Split on a `;` at the end of a line, like the Rust stack harness."""
    statements, current = [], []
    for line in text.splitlines(keepends=True):
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("".join(current))
            current = []
    rest = "".join(current)
    leftover = [line for line in rest.splitlines() if line.strip() and not line.strip().startswith("--")]
    assert not leftover, f"SQL after the last statement: {leftover}"
    return [s for s in statements if any(l.strip() and not l.strip().startswith("--") for l in s.splitlines())]


class ServerTestCase(unittest.TestCase):
    """Starts one server per class on a fresh data directory."""

    server = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="chdb-http-test-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, True)
        cls.server = ServerProcess(os.path.join(cls.tmp, "data"))
        cls.addClassCleanup(cls.server.stop)
        cls.server.start()


# ---------------------------------------------------------------------------
# RowBinary, built by hand.


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def rb_string(value):
    data = value.encode() if isinstance(value, str) else value
    return varint(len(data)) + data


def rb_map(mapping):
    return varint(len(mapping)) + b"".join(rb_string(k) + rb_string(v) for k, v in mapping.items())


def rb_array(items, encode):
    return varint(len(items)) + b"".join(encode(item) for item in items)


# The exact column list rotel 0.0.1-alpha10 sends (captured on the wire).
ROTEL_TRACE_COLUMNS = (
    "Timestamp,TraceId,SpanId,ParentSpanId,TraceState,SpanName,SpanKind,ServiceName,ResourceAttributes,"
    "ScopeName,ScopeVersion,SpanAttributes,Duration,StatusCode,StatusMessage,Events.Timestamp,Events.Name,"
    "Events.Attributes,Links.TraceId,Links.SpanId,Links.TraceState,Links.Attributes"
)


def rowbinary_span(timestamp_ns, trace_id, span_id, name, service, resource_attrs, span_attrs, duration_ns=1000):
    return b"".join(
        [
            struct.pack("<q", timestamp_ns),
            rb_string(trace_id),
            rb_string(span_id),
            rb_string(""),
            rb_string(""),
            rb_string(name),
            rb_string("Internal"),
            rb_string(service),
            rb_map(resource_attrs),
            rb_string("gitlab-ci-runner"),
            rb_string("1.0"),
            rb_map(span_attrs),
            struct.pack("<Q", duration_ns),
            rb_string("Ok"),
            rb_string(""),
            rb_array([timestamp_ns], lambda t: struct.pack("<q", t)),
            rb_array(["event"], rb_string),
            rb_array([{"k": "v"}], rb_map),
            rb_array([], rb_string),
            rb_array([], rb_string),
            rb_array([], rb_string),
            rb_array([], rb_map),
        ]
    )


def random_hex(n_bytes):
    return "".join(random.choice("0123456789abcdef") for _ in range(2 * n_bytes))


# ---------------------------------------------------------------------------


class LexerTest(unittest.TestCase):
    """The query analysis decides where INSERT data starts: check it directly."""

    def check(self, text, **expected):
        analysis = chdb_http.analyze(text)
        actual = {name: getattr(analysis, name) for name in expected}
        self.assertEqual(actual, expected, text)

    def test_insert_with_format_splits_after_the_first_newline(self):
        text = "INSERT INTO t (a, `format`) FORMAT RowBinary\n\n\x00 data"
        self.check(text, keyword="INSERT", insert_format="RowBinary", data_start=text.index("\n") + 1)

    def test_insert_settings_position_is_found(self):
        text = "insert into t settings x = 'FORMAT' format CSV 1,2"
        self.check(text, insert_format="CSV", settings_at=text.index("settings"), data_start=len(text) - 3)

    def test_insert_values_and_select_have_no_data_part(self):
        self.check("INSERT INTO t VALUES (1, 'FORMAT x')", insert_format=None)
        self.check("INSERT INTO t SELECT 1 FORMAT JSON", insert_format=None)

    def test_output_format_and_statements(self):
        self.check("SELECT 'FORMAT CSV' /* FORMAT XML */ FORMAT JSON", keyword="SELECT", output_format="JSON")
        self.check("SELECT format FROM t", output_format=None)
        self.check("SELECT 1 FORMAT CSV SETTINGS max_threads = 1;", output_format="CSV", multi_statement=False)
        self.check("-- comment\nSELECT 1; SELECT 2", keyword="SELECT", multi_statement=True)
        self.check("  -- only a comment", keyword="")


class GroupSelectFormTest(unittest.TestCase):
    """What a group commit's INSERT ... SELECT FROM file() is built from."""

    def test_the_target_of_an_insert_with_a_column_list(self):
        target = chdb_http.insert_target(
            "INSERT INTO otel.`otel traces` (Timestamp, `odd``name`, \"q\", Events.Name) SETTINGS async_insert = 1"
        )
        self.assertEqual(target, chdb_http.InsertTarget("otel", "otel traces", ("Timestamp", "odd`name", "q", "Events.Name")))
        self.assertEqual(chdb_http.insert_target("insert into table t (a)"), chdb_http.InsertTarget(None, "t", ("a",)))

    def test_other_insert_forms_have_no_target(self):
        for head in (
            "INSERT INTO t",  # no column list: the table's own, left to INFILE
            "INSERT INTO t (*)",
            "INSERT INTO t (COLUMNS('a'))",
            "INSERT INTO t (a, b + 1)",
            "INSERT INTO FUNCTION file('x', RowBinary) (a)",
            "INSERT INTO a.b.c (a)",
            "INSERT INTO t (a) PARTITION BY a",
            "INSERT INTO t (a",
        ):
            self.assertIsNone(chdb_http.insert_target(head), head)

    def test_plain_type_drops_low_cardinality_at_any_depth(self):
        cases = {
            "LowCardinality(String)": "String",
            "Map(LowCardinality(String), String)": "Map(String, String)",
            "Array(LowCardinality(Nullable(String)))": "Array(Nullable(String))",
            "Tuple(a LowCardinality(String), b Nullable(UInt8))": "Tuple(a String, b Nullable(UInt8))",
            "Enum8('LowCardinality(' = 1, ')' = 2)": "Enum8('LowCardinality(' = 1, ')' = 2)",
            "DateTime64(9, 'UTC')": "DateTime64(9, 'UTC')",
            "MyLowCardinality(String)": "MyLowCardinality(String)",
        }
        for given, expected in cases.items():
            self.assertEqual(chdb_http.plain_type(given), expected, given)


class HttpInterfaceTest(ServerTestCase):
    def test_ping_and_root_answer_ok_without_credentials(self):
        for path in ("/ping", "/"):
            status, headers, body = self.server.request("GET", path=path, auth=None)
            self.assertEqual((status, body), (200, b"Ok.\n"), path)
        status, _, body = self.server.request("HEAD", path="/ping", auth=None)
        self.assertEqual((status, body), (200, b""))

    def test_the_server_runs_without_pyarrow(self):
        # chDB would load pyarrow and numpy, for Python APIs the server never
        # calls: half of every start's CPU.
        with open(f"/proc/{self.server.proc.pid}/maps") as maps:
            loaded = maps.read()
        self.assertTrue("chdb" in loaded, "chDB's library is not loaded")
        self.assertFalse("libarrow" in loaded, "pyarrow's library is loaded")
        self.assertFalse("numpy" in loaded, "numpy is loaded")

    def test_unknown_path_is_404(self):
        status, _, body = self.server.request("GET", path="/nope", auth=None)
        self.assertEqual(status, 404)
        self.assertIn(b"There is no handle /nope", body)

    def test_syntax_error_is_400_with_code_62(self):
        status, headers, body = self.server.request("POST", body="SELEC 1")
        self.assertEqual(status, 400)
        self.assertEqual(headers["x-clickhouse-exception-code"], "62")
        self.assertTrue(body.startswith(b"Code: 62. DB::Exception: Syntax error"), body)
        self.assertTrue(body.endswith(b"\n"))

    def test_unknown_identifier_and_unknown_table_are_404(self):
        # As ClickHouse's exceptionCodeToHTTPStatus: UNKNOWN_IDENTIFIER is 404.
        status, headers, _ = self.server.request("POST", body="SELECT no_such_column")
        self.assertEqual((status, headers["x-clickhouse-exception-code"]), (404, "47"))
        status, headers, body = self.server.request("POST", body="SELECT * FROM no_such_table")
        self.assertEqual((status, headers["x-clickhouse-exception-code"]), (404, "60"))
        self.assertIn(b"UNKNOWN_TABLE", body)

    def test_insert_into_missing_table_is_refused_with_the_code(self):
        query = urllib.parse.urlencode({"query": "INSERT INTO missing_table FORMAT JSONEachRow"})
        status, headers, body = self.server.request("POST", query, body='{"a": 1}\n')
        self.assertNotEqual(status, 200)
        self.assertEqual(headers["x-clickhouse-exception-code"], "60")
        self.assertIn(b"missing_table", body)

    def test_bad_insert_data_is_never_200(self):
        self.server.query("CREATE TABLE IF NOT EXISTS bad_data (a UInt32, s String) ENGINE = MergeTree ORDER BY a")
        query = urllib.parse.urlencode({"query": "INSERT INTO bad_data (a, s) FORMAT RowBinary"})
        status, headers, body = self.server.request("POST", query, body=b"\x01\x02")  # truncated UInt32
        # CANNOT_READ_ALL_DATA is not in ClickHouse's table of client errors: 500 there too.
        self.assertEqual(status, 500, body)
        self.assertEqual(headers["x-clickhouse-exception-code"], "33")
        query = urllib.parse.urlencode({"query": "INSERT INTO bad_data FORMAT JSONEachRow"})
        status, headers, _ = self.server.request("POST", query, body=b'{"a": "not a number"}\n')
        self.assertNotEqual(status, 200)
        self.assertIn("x-clickhouse-exception-code", headers)
        self.assertEqual(self.server.query("SELECT count() FROM bad_data"), "0\n")

    def test_authentication(self):
        failed = (
            b"Code: 516. DB::Exception: default: Authentication failed: password is incorrect, "
            b"or there is no user with such name. (AUTHENTICATION_FAILED)\n"
        )
        wrong = {"X-ClickHouse-User": "default", "X-ClickHouse-Key": "wrong"}
        status, headers, body = self.server.request("POST", body="SELECT 1", headers=wrong, auth=None)
        self.assertEqual((status, headers["x-clickhouse-exception-code"], body), (403, "516", failed))
        status, headers, body = self.server.request("POST", body="SELECT 1", auth=None)
        self.assertEqual((status, headers["x-clickhouse-exception-code"], body), (401, "516", failed))
        status, _, _ = self.server.request("GET", "query=SELECT+1&user=default&password=nope", auth=None)
        self.assertEqual(status, 403)
        bad_basic = {"Authorization": "Basic " + base64.b64encode(b"someone:" + PASSWORD.encode()).decode()}
        status, _, _ = self.server.request("POST", body="SELECT 1", headers=bad_basic, auth=None)
        self.assertEqual(status, 403)

        self.assertEqual(self.server.request("POST", body="SELECT 1", auth="headers")[::2], (200, b"1\n"))
        self.assertEqual(self.server.request("POST", body="SELECT 1", auth="basic")[::2], (200, b"1\n"))
        query = urllib.parse.urlencode({"query": "SELECT 1", "user": "default", "password": PASSWORD})
        self.assertEqual(self.server.request("GET", query, auth=None)[::2], (200, b"1\n"))
        key_only = {"X-ClickHouse-Key": PASSWORD}  # what rotel sends without --clickhouse-exporter-user
        self.assertEqual(self.server.request("POST", body="SELECT 1", headers=key_only, auth=None)[::2], (200, b"1\n"))

    def test_password_never_reaches_the_log(self):
        query = urllib.parse.urlencode({"query": "SELECT 'log-marker-1'", "user": "default", "password": PASSWORD})
        self.assertEqual(self.server.request("GET", query, auth=None)[0], 200)
        self.server.request("POST", body="SELECT 'log-marker-2'", auth="basic")
        poll(lambda: "log-marker-2" in self.server.stderr_text(), 10, what="the request log line")
        log = self.server.stderr_text()
        self.assertIn("log-marker-1", log)
        self.assertNotIn(PASSWORD, log)
        self.assertNotIn(base64.b64encode(f"default:{PASSWORD}".encode()).decode(), log)

    def test_chunked_rowbinary_insert_lands(self):
        self.server.query(
            "CREATE TABLE IF NOT EXISTS rb (id UInt32, name String, ts DateTime64(9), tags Map(String, String)) "
            "ENGINE = MergeTree ORDER BY id"
        )
        now = time.time_ns()
        rows = [
            struct.pack("<I", i) + rb_string(f"row-{i}") + struct.pack("<q", now + i) + rb_map({"k": str(i)})
            for i in range(100)
        ]
        data = b"".join(rows)
        chunks = [data[i : i + 37] for i in range(0, len(data), 37)]  # chunk borders inside rows
        query = urllib.parse.urlencode({"query": "INSERT INTO rb (id, name, ts, tags) FORMAT RowBinary"})
        status, headers, body = self.server.request("POST", query, chunks=chunks)
        self.assertEqual(status, 200, body)
        summary = json.loads(headers["x-clickhouse-summary"])
        self.assertEqual(summary["written_rows"], "100")
        self.assertEqual(self.server.query("SELECT count(), sum(id), max(name) FROM rb"), "100\t4950\trow-99\n")
        self.assertEqual(self.server.query("SELECT tags['k'] FROM rb WHERE id = 42"), "42\n")

    def test_jsoneachrow_insert_with_data_in_body_lands(self):
        self.server.query("CREATE TABLE IF NOT EXISTS js (id UInt32, s String) ENGINE = MergeTree ORDER BY id")
        query = urllib.parse.urlencode({"query": "INSERT INTO js FORMAT JSONEachRow"})
        status, _, body = self.server.request("POST", query, body='{"id": 1, "s": "a"}\n{"id": 2, "s": "b"}\n')
        self.assertEqual(status, 200, body)
        status, _, body = self.server.request(
            "POST", body='INSERT INTO js (id, s) FORMAT JSONEachRow\n{"id": 3, "s": "c"}\n{"id": 4, "s": "FORMAT"}\n'
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(self.server.query("SELECT groupArray(s) FROM (SELECT s FROM js ORDER BY id)"), "['a','b','c','FORMAT']\n")

    def test_tabseparated_and_csv_inserts_land(self):
        self.server.query("CREATE TABLE IF NOT EXISTS tsv (id UInt32, s String) ENGINE = MergeTree ORDER BY id")
        query = urllib.parse.urlencode({"query": "INSERT INTO tsv FORMAT TabSeparated"})
        self.assertEqual(self.server.request("POST", query, body="1\tone\n2\ttwo\n")[0], 200)
        query = urllib.parse.urlencode({"query": "INSERT INTO tsv (id, s) FORMAT CSV"})
        self.assertEqual(self.server.request("POST", query, body='3,"three"\n')[0], 200)
        self.assertEqual(self.server.request("POST", body="INSERT INTO tsv VALUES (4, 'four')")[0], 200)
        self.assertEqual(self.server.query("SELECT count() FROM tsv"), "4\n")

    def test_select_formats(self):
        status, headers, body = self.server.request("GET", "query=" + urllib.parse.quote("SELECT 1 AS a, 'x' AS b"))
        self.assertEqual((status, body), (200, b"1\tx\n"))
        self.assertEqual(headers["x-clickhouse-format"], "TabSeparated")
        self.assertTrue(headers["content-type"].startswith("text/tab-separated-values"))
        status, headers, body = self.server.request("POST", "default_format=JSONEachRow", body="SELECT 1 AS a")
        self.assertEqual((status, body), (200, b'{"a":1}\n'))
        self.assertEqual(headers["x-clickhouse-format"], "JSONEachRow")
        status, headers, body = self.server.request("POST", "default_format=JSONEachRow", body="SELECT 1 AS a FORMAT CSV")
        self.assertEqual((status, body, headers["x-clickhouse-format"]), (200, b"1\n", "CSV"))
        status, headers, body = self.server.request(
            "POST", "default_format=RowBinaryWithNamesAndTypes", body="SELECT toUInt8(7) AS n"
        )
        self.assertEqual((status, body), (200, b"\x01\x01n\x05UInt8\x07"))
        self.assertEqual(headers["content-type"], "application/octet-stream")
        self.assertIsInstance(json.loads(headers["x-clickhouse-summary"]), dict)

    def test_database_parameter_selects_the_database_for_unqualified_names(self):
        self.server.query("CREATE DATABASE IF NOT EXISTS dbparam")
        self.server.query("CREATE TABLE IF NOT EXISTS dbparam.t (id UInt32) ENGINE = MergeTree ORDER BY id")
        query = urllib.parse.urlencode({"database": "dbparam", "query": "INSERT INTO t (id) FORMAT RowBinary"})
        self.assertEqual(self.server.request("POST", query, chunks=[struct.pack("<I", 5)])[0], 200)
        self.assertEqual(self.server.query("SELECT sum(id) FROM t", database="dbparam"), "5\n")
        self.assertEqual(self.server.query("SELECT currentDatabase()", database="dbparam"), "dbparam\n")
        # Nothing sticks to the next request.
        self.assertEqual(self.server.query("SELECT currentDatabase()"), "default\n")
        status, headers, _ = self.server.request("POST", "database=no_such_db", body="SELECT 1")
        self.assertEqual((status, headers["x-clickhouse-exception-code"]), (404, "81"))

    def test_settings_apply_to_one_query_only(self):
        self.assertEqual(self.server.query("SELECT getSetting('max_result_rows')", max_result_rows="7"), "7\n")
        self.assertEqual(self.server.query("SELECT getSetting('max_result_rows')"), "0\n")
        self.assertEqual(self.server.query("SELECT 1", no_such_setting_anywhere="1", query_id="q-1"), "1\n")
        status, headers, _ = self.server.request("POST", "max_result_rows=abc", body="SELECT 1")
        self.assertEqual(status, 400)
        self.assertEqual(self.server.query("SELECT {x:UInt32} + 1", param_x="41"), "42\n")

    def test_session_state_cannot_be_changed_by_clients(self):
        self.assertEqual(self.server.request("POST", body="SET readonly = 1")[0], 200)
        self.assertEqual(self.server.request("POST", body="USE system")[0], 200)
        self.assertEqual(self.server.query("SELECT currentDatabase()"), "default\n")
        self.server.query("CREATE TABLE IF NOT EXISTS still_writable (a UInt8) ENGINE = Memory")
        status, headers, _ = self.server.request("POST", "readonly=1", body="INSERT INTO still_writable VALUES (1)")
        self.assertEqual(headers["x-clickhouse-exception-code"], "164")
        self.assertNotEqual(status, 200)
        self.server.query("INSERT INTO still_writable VALUES (2)")
        status, headers, _ = self.server.request("POST", body="SELECT 1; SET readonly = 1")
        self.assertEqual((status, headers["x-clickhouse-exception-code"]), (400, "62"))

    def test_get_is_read_only(self):
        query = urllib.parse.urlencode({"query": "CREATE TABLE via_get (a UInt8) ENGINE = Memory"})
        status, headers, _ = self.server.request("GET", query)
        self.assertNotEqual(status, 200)
        self.assertEqual(headers["x-clickhouse-exception-code"], "164")

    def test_keep_alive_survives_errors(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            for sql, expected_status in (("SELECT 1", 200), ("SELEC 1", 400), ("SELECT 2", 200), ("SELECT 3", 200)):
                status, _, _ = self.server.request_on(connection, "POST", body=sql)
                self.assertEqual(status, expected_status, sql)
            status, _, body = self.server.request_on(connection, "POST", body="SELECT 4")
            self.assertEqual((status, body), (200, b"4\n"))
        finally:
            connection.close()

    def raw_exchange(self, raw):
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=30) as sock:
            sock.sendall(raw)
            response = b""
            while True:
                piece = sock.recv(65536)
                if not piece:
                    return response
                response += piece

    def test_malformed_http_is_400_and_the_server_lives_on(self):
        auth = f"X-ClickHouse-Key: {PASSWORD}\r\n".encode()
        bad_chunk = b"POST /?query=SELECT+1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + auth + b"\r\nzz\r\n"
        response = self.raw_exchange(bad_chunk)
        self.assertTrue(response.startswith(b"HTTP/1.1 400"), response[:200])
        self.assertIn(b"Invalid chunk size", response)
        too_large = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n" + auth + b"\r\n"
        response = self.raw_exchange(too_large)
        self.assertTrue(response.startswith(b"HTTP/1.1 413"), response[:200])
        self.assertIn(b"X-ClickHouse-Exception-Code: 229", response)
        self.assertIn(b"larger than the limit", response)
        truncated = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + auth + b"\r\n8\r\nSELECT"
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=30) as sock:
            sock.sendall(truncated)
            sock.shutdown(socket.SHUT_WR)
            self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 400"))
        self.assertEqual(self.server.request("GET", path="/ping", auth=None)[0], 200)

    def test_a_grouped_insert_stores_every_type_as_an_insert_from_infile_does(self):
        # The group commit parses RowBinary as the plain types (no LowCardinality)
        # and lets the INSERT convert: the stored rows must be exactly those of
        # an insert FROM INFILE (one with a query parameter is never grouped).
        columns = (
            "id UInt32, lc LowCardinality(String), lcn LowCardinality(Nullable(String)), "
            "m Map(LowCardinality(String), String), arr Array(LowCardinality(String)), n Nullable(Int64), "
            "e Enum8('a(' = 1, 'b)' = 2), ts DateTime64(9, 'UTC'), d Decimal(18, 4), u UUID, ip IPv6, "
            "fs FixedString(3), tup Tuple(x LowCardinality(String), y UInt8), `odd name` LowCardinality(String), "
            "nested Nested(k LowCardinality(String), v UInt16)"
        )
        insert_columns = "id, lc, lcn, m, arr, n, e, ts, d, u, ip, fs, tup, `odd name`, nested.k, nested.v"
        for table in ("typed_src", "typed_grouped", "typed_infile"):
            self.server.query(
                f"CREATE TABLE {table} ({columns}, lc_copy String MATERIALIZED lc) ENGINE = MergeTree ORDER BY id"
            )
        self.server.query(
            f"INSERT INTO typed_src ({insert_columns}) SELECT number, toString(number % 7), "
            "if(number % 3 = 0, NULL, toString(number % 11)), map(toString(number % 5), toString(number)), "
            "[toString(number % 2), 'x'], if(number % 4 = 0, NULL, number * 1000003), if(number % 2 = 0, 'a(', 'b)'), "
            "toDateTime64('2026-12-02 10:00:00', 9, 'UTC') + toIntervalNanosecond(number * 7), number / 7, "
            "generateUUIDv4(number), IPv6NumToString(toFixedString(reinterpretAsString(number), 16)), 'abc', "
            "(toString(number % 3), number % 256), 'odd', [toString(number), 'k'], [number % 100, 7] FROM numbers(20000)"
        )
        status, _, data = self.server.request(
            "POST", body=f"SELECT {insert_columns} FROM typed_src ORDER BY id FORMAT RowBinary"
        )
        self.assertEqual(status, 200, data)
        # Large enough for the SELECT form (small groups run FROM INFILE).
        self.assertGreaterEqual(len(data), chdb_http.ingest.DEFAULT_SELECT_MIN_BYTES)
        for table, params in (("typed_grouped", {}), ("typed_infile", {"param_unused": "1"})):
            query = urllib.parse.urlencode({"query": f"INSERT INTO {table} ({insert_columns}) FORMAT RowBinary", **params})
            status, _, body = self.server.request("POST", query, body=data)
            self.assertEqual(status, 200, body)
        everything = "SELECT *, lc_copy FROM {} ORDER BY id FORMAT TSVWithNamesAndTypes"
        expected = self.server.query(everything.format("typed_src"))
        self.assertEqual(expected.count("\n"), 20002)
        self.assertEqual(self.server.query(everything.format("typed_infile")), expected)
        self.assertEqual(self.server.query(everything.format("typed_grouped")), expected)
        log = self.server.stderr_text()
        self.assertIn("Group insert of 1 requests", log)
        self.assertIn("(SELECT FROM file())", log)
        self.assertNotIn("failed, running the group FROM INFILE", log)

    def test_concurrent_writers_lose_nothing(self):
        self.server.query("CREATE TABLE IF NOT EXISTS conc (writer UInt8, n UInt32) ENGINE = MergeTree ORDER BY (writer, n)")
        writers, batches, rows_per_batch = 6, 10, 25
        errors = []

        def write(writer):
            connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
            try:
                for batch in range(batches):
                    rows = b"".join(
                        struct.pack("<BI", writer, batch * rows_per_batch + i) for i in range(rows_per_batch)
                    )
                    query = urllib.parse.urlencode({"query": "INSERT INTO conc (writer, n) FORMAT RowBinary"})
                    status, _, body = self.server.request_on(connection, "POST", query, chunks=[rows[:7], rows[7:]])
                    if status != 200:
                        errors.append((writer, batch, status, body))
                    reader_status, _, _ = self.server.request_on(connection, "POST", body="SELECT count() FROM conc")
                    if reader_status != 200:
                        errors.append((writer, batch, "read", reader_status))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append((writer, repr(exc)))
            finally:
                connection.close()

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(errors, [])
        expected_rows = writers * batches * rows_per_batch
        self.assertEqual(
            self.server.query("SELECT count(), uniqExact(writer, n) FROM conc"), f"{expected_rows}\t{expected_rows}\n"
        )


class PersistenceTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="chdb-http-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def test_data_persists_across_a_restart(self):
        data_dir = os.path.join(self.tmp, "data")
        first = ServerProcess(data_dir)
        self.addCleanup(first.stop)
        first.start()
        first.query("CREATE DATABASE IF NOT EXISTS keep")
        first.query("CREATE TABLE keep.t (id UInt32, s String) ENGINE = MergeTree ORDER BY id")
        query = urllib.parse.urlencode({"query": "INSERT INTO keep.t FORMAT JSONEachRow"})
        self.assertEqual(first.request("POST", query, body='{"id": 1, "s": "kept"}\n')[0], 200)
        self.assertEqual(first.stop(), 0, first.stderr_text()[-2000:])

        second = ServerProcess(data_dir)
        self.addCleanup(second.stop)
        second.start()
        self.assertEqual(second.query("SELECT id, s FROM t", database="keep"), "1\tkept\n")

    def test_unusable_data_dir_fails_with_one_line(self):
        not_a_dir = os.path.join(self.tmp, "file")
        open(not_a_dir, "w").close()
        result = subprocess.run(
            [sys.executable, SERVER, "--listen", "127.0.0.1:0", "--data", not_a_dir],
            capture_output=True,
            timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stdout, b"")
        lines = result.stderr.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("data directory", lines[0])
        self.assertNotIn("Traceback", lines[0])


class SchemaAndCollectorTest(ServerTestCase):
    """compose/sql applied to chdb-http, fed by the real collector (rotel)."""

    rotel = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.server.apply_schema()

    def traces_query(self, sql):
        return self.server.query(sql, database="otel")

    def test_schema_is_idempotent_and_complete(self):
        self.server.apply_schema()
        tables = self.traces_query("SELECT groupArray(name) FROM (SELECT name FROM system.tables WHERE database = 'otel' ORDER BY name)")
        self.assertEqual(
            tables,
            "['ci_job_telemetry_traces','ci_job_telemetry_traces_mv','otel_logs','otel_traces',"
            "'otel_traces_trace_id_ts','otel_traces_trace_id_ts_mv']\n",
        )

    def test_rowbinary_insert_with_rotel_column_list(self):
        trace_id = random_hex(16)
        now = time.time_ns()
        rows = rowbinary_span(
            now, trace_id, random_hex(8), "job_execution", "gitlab-ci-runner", {"service.name": "gitlab-ci-runner"},
            {"ci.job.id": "501", "ci.pipeline.id": "601", "ci.project.id": "701"},
        ) + rowbinary_span(now, trace_id, random_hex(8), "other", "not-ci", {}, {"ci.job.id": "502"})
        query = urllib.parse.urlencode(
            {"database": "otel", "query": f"INSERT INTO otel_traces ({ROTEL_TRACE_COLUMNS}) FORMAT RowBinary"}
        )
        status, _, body = self.server.request("POST", query, chunks=[rows[:50], rows[50:]])
        self.assertEqual(status, 200, body)
        self.assertEqual(self.traces_query(f"SELECT count() FROM otel_traces WHERE TraceId = '{trace_id}'"), "2\n")
        self.assertEqual(
            self.traces_query(
                f"SELECT build_id, pipeline_id, project_id FROM ci_job_telemetry_traces WHERE trace_id = '{trace_id}'"
            ),
            "501\t601\t701\n",
        )
        self.assertEqual(
            self.traces_query(f"SELECT count() FROM otel_traces_trace_id_ts WHERE TraceId = '{trace_id}'"), "1\n"
        )

    def start_rotel(self, compression="none"):
        """Starts rotel-agent; `compression=None` leaves its default (lz4 blocks)."""
        agent = rotel_agent_path()
        if agent is None:
            self.fail("rotel-agent not found: install rotel==0.0.1a15 into this Python (compose/requirements.txt)")
        grpc_port, http_port = free_port(), free_port()
        log_path = os.path.join(self.tmp, f"rotel-{grpc_port}.log")
        log = open(log_path, "ab")
        self.addCleanup(log.close)
        compression_args = [] if compression is None else ["--clickhouse-exporter-compression", compression]
        proc = subprocess.Popen(
            [
                agent, "start",
                "--exporter", "clickhouse",
                "--clickhouse-exporter-endpoint", self.server.url,
                *compression_args,
                "--clickhouse-exporter-async-insert", "false",
                "--clickhouse-exporter-user", "default",
                "--clickhouse-exporter-password", PASSWORD,
                "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}",
                "--otlp-http-endpoint", f"127.0.0.1:{http_port}",
                "--batch-timeout", "200ms",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def stop():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

        self.addCleanup(stop)

        def listening():
            if proc.poll() is not None:
                raise AssertionError(f"rotel-agent exited with {proc.returncode}: {open(log_path, 'rb').read()[-2000:]!r}")
            try:
                socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
                return True
            except OSError:
                return False

        poll(listening, ROTEL_DEADLINE_SECONDS, what="rotel's OTLP/HTTP port")
        return http_port, log_path

    def post_otlp(self, port, path, payload):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("POST", path, body=json.dumps(payload), headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def test_rotel_at_its_default_compression(self):
        # rotel sends lz4 by default: ClickHouse's compressed blocks, decompress=1.
        port, rotel_log = self.start_rotel(compression=None)
        trace_id = random_hex(16)
        now = time.time_ns()
        span = {
            "traceId": trace_id,
            "spanId": random_hex(8),
            "name": "compressed",
            "kind": 1,
            "startTimeUnixNano": str(now),
            "endTimeUnixNano": str(now + 1000),
        }
        resource = {"attributes": [{"key": "service.name", "value": {"stringValue": "lz4-check"}}]}
        payload = {"resourceSpans": [{"resource": resource, "scopeSpans": [{"scope": {"name": "t"}, "spans": [span]}]}]}
        status, body = self.post_otlp(port, "/v1/traces", payload)
        self.assertEqual(status, 200, body)

        def landed():
            return self.traces_query(f"SELECT ServiceName FROM otel_traces WHERE TraceId = '{trace_id}'") == "lz4-check\n"

        try:
            poll(landed, ROTEL_DEADLINE_SECONDS, interval=0.1, what="the span sent with lz4 in ClickHouse")
        except AssertionError as error:
            raise AssertionError(f"{error}\nrotel log: {open(rotel_log, 'rb').read()[-3000:]!r}") from None

    def test_end_to_end_through_rotel(self):
        port, rotel_log = self.start_rotel()
        trace_id = random_hex(16)
        now = time.time_ns()

        def attrs(**values):
            return [
                {"key": key.replace("__", "."), "value": {"intValue": str(v)} if isinstance(v, int) else {"stringValue": v}}
                for key, v in values.items()
            ]

        def span(name, span_attributes, parent=""):
            return {
                "traceId": trace_id,
                "spanId": random_hex(8),
                "parentSpanId": parent,
                "name": name,
                "kind": 1,
                "startTimeUnixNano": str(now),
                "endTimeUnixNano": str(now + 2_000_000),
                "attributes": span_attributes,
                "status": {"code": 1},
            }

        def resource_spans(resource_attributes, spans):
            return {
                "resource": {"attributes": resource_attributes},
                "scopeSpans": [{"scope": {"name": "gitlab-ci-runner", "version": "1.0"}, "spans": spans}],
            }

        payload = {
            "resourceSpans": [
                # ci.* on the spans: what the runner does upstream.
                resource_spans(
                    attrs(service__name="gitlab-ci-runner", ci__job__id=9),
                    [
                        span(
                            "job_execution",
                            attrs(ci__job__id=1001, ci__pipeline__id=2001, ci__project__id=3001, ci__runner__id=4001,
                                  ci__pipeline__source="push", ci__job__status="success",
                                  ci__namespace__traversal_path="9970-", ci__runner__system_id="s_abc"),
                        ),
                        span(
                            "restore_cache",
                            attrs(ci__job__id=1001, ci__pipeline__id=2001, ci__project__id=3001, ci__cache__key="deps",
                                  ci__network__rx_bytes=1234),
                        ),
                    ],
                ),
                # ci.* on the resource only.
                resource_spans(
                    attrs(service__name="gitlab-ci-rails", ci__job__id=1002, ci__pipeline__id=2002, ci__project__id=3002),
                    [span("job_pending", [])],
                ),
                # Another service: never reaches the CI table.
                resource_spans(
                    attrs(service__name="unrelated-service", ci__job__id=1003, ci__pipeline__id=2003),
                    [span("whatever", attrs(ci__project__id=3003))],
                ),
            ]
        }
        status, body = self.post_otlp(port, "/v1/traces", payload)
        self.assertEqual(status, 200, body)
        logs_payload = {
            "resourceLogs": [
                {
                    "resource": {"attributes": attrs(service__name="gitlab-ci-runner")},
                    "scopeLogs": [
                        {
                            "scope": {"name": "gitlab-ci-runner"},
                            "logRecords": [
                                {
                                    "timeUnixNano": str(now),
                                    "severityText": "INFO",
                                    "severityNumber": 9,
                                    "body": {"stringValue": f"log for {trace_id}"},
                                    "traceId": trace_id,
                                    "attributes": attrs(ci__job__id=1001),
                                }
                            ],
                        }
                    ],
                }
            ]
        }
        status, body = self.post_otlp(port, "/v1/logs", logs_payload)
        self.assertEqual(status, 200, body)

        def landed():
            spans = self.traces_query(f"SELECT count() FROM otel_traces WHERE TraceId = '{trace_id}'").strip()
            logs = self.traces_query(f"SELECT count() FROM otel_logs WHERE TraceId = '{trace_id}'").strip()
            return (spans, logs) == ("4", "1")

        try:
            poll(landed, ROTEL_DEADLINE_SECONDS, interval=0.1, what="the spans and the log record in ClickHouse")
        except AssertionError as error:
            raise AssertionError(f"{error}\nrotel log: {open(rotel_log, 'rb').read()[-3000:]!r}") from None

        rows = self.traces_query(
            "SELECT span_name, service_name, build_id, pipeline_id, project_id, runner_id, pipeline_source, job_status, "
            "traversal_path, runner_manager_system_xid, resource_type, resource_operation, resource_key, resource_hit, "
            "rx_bytes, tx_bytes, status_code "
            f"FROM ci_job_telemetry_traces WHERE trace_id = '{trace_id}' ORDER BY span_name"
        )
        self.assertEqual(
            rows.splitlines(),
            [
                "job_execution\tgitlab-ci-runner\t1001\t2001\t3001\t4001\tpush\tsuccess\t9970-\ts_abc\t\t\t\t-1\t-1\t-1\tOk",
                "job_pending\tgitlab-ci-rails\t1002\t2002\t3002\t0\t\t\t\t\t\t\t\t-1\t-1\t-1\tOk",
                "restore_cache\tgitlab-ci-runner\t1001\t2001\t3001\t0\t\t\t\t\tcache\trestore\tdeps\t-1\t1234\t-1\tOk",
            ],
        )
        self.assertEqual(
            self.traces_query(
                f"SELECT metadata['ci.job.id'], duration_ns FROM ci_job_telemetry_traces "
                f"WHERE trace_id = '{trace_id}' AND span_name = 'job_execution'"
            ),
            "1001\t2000000\n",
        )
        self.assertEqual(
            self.traces_query(f"SELECT count() FROM otel_traces_trace_id_ts WHERE TraceId = '{trace_id}'"), "1\n"
        )


if __name__ == "__main__":
    unittest.main()
