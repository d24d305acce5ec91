#!/usr/bin/env python3
"""chdb-http: ClickHouse's HTTP interface in front of an embedded chDB engine.

chDB is the ClickHouse engine as a Python module and has no network server.
This program is that server for the embedded stack: the collector (rotel),
the Rust `clickhouse` crate, SQL clients and curl talk to it exactly as they
would talk to clickhouse-server on port 8123.

    python chdb_http.py --listen 127.0.0.1:0 --data DIR [--user default --password SECRET]

The password may also come from the `CHDB_HTTP_PASSWORD` environment variable
(it then does not show in `ps`). Once listening, exactly one line goes to
stdout: `chdb-http listening on http://HOST:PORT`. Logs go to stderr, one line
per request; they never contain credentials.

What goes over the wire (the subset of ClickHouse's HTTP interface we speak):
- `GET /ping`, `HEAD /ping`, `GET /` without a query: `200 Ok.\n`.
- `GET|POST /?query=...`, or the query in the POST body. When `query` is in
  the URL and the body is not empty, the body is the data of the INSERT
  (ClickHouse concatenates: URL query, "\n", body). A body may also hold
  `INSERT ... FORMAT X` followed by the data. Bodies may be chunked.
- Data after `FORMAT X` is written to a temporary file and inserted with
  `INSERT ... FROM INFILE '<file>' FORMAT X`, so every input format chDB
  knows works (RowBinary, JSONEachRow, TabSeparated, CSV, Native, ...).
  RowBinary inserts are committed in groups (module `ingest`), as
  `INSERT ... SELECT * FROM file(...)` where the insert names its columns.
- URL parameters: `database` (default `default`), `default_format` (default
  TabSeparated; a FORMAT clause in the query wins), `param_<name>` (query
  parameters `{name:Type}`), `user`/`password`, and ClickHouse settings,
  which are applied to the one query (see `Engine.execute`).
- `multipart/form-data` bodies: their fields are parameters like the URL's
  (`query`, `param_<name>`, settings), as the `clickhouse` crate sends
  `.param()` values. Parts with a file are external data: a temporary table
  named like the part, for this query only (`<name>_structure` or
  `<name>_types`, `<name>_format`).
- Compressed transfer (module `http_compression`): a request
  `Content-Encoding` (gzip, deflate, br, zstd, lz4, xz), `decompress=1`
  bodies in ClickHouse's compressed blocks (LZ4, ZSTD, none; CityHash128
  checksums verified), `compress=1` answers in blocks (LZ4), and with
  `enable_http_compression=1` answers in an `Accept-Encoding` ClickHouse
  knows.
- Bodies go to a temporary file as they arrive (at most MAX_BODY_BYTES on
  the wire, MAX_DECODED_BODY_BYTES decoded); only `max_query_size` bytes
  (ClickHouse's default 262144, or the URL setting) are read as query text.
  INSERT data beyond them is inserted from the file; any other query longer
  than that fails with ClickHouse's "Max query size exceeded" (code 62).
- Errors never answer 200: the body is ClickHouse's message, the header
  `X-ClickHouse-Exception-Code` carries the code, and the status is the one
  ClickHouse gives that code (`http_status_for_code`). The request body is
  read to its end before an error is answered, so keep-alive clients get
  the error instead of a closed connection. POST without Content-Length
  or chunked encoding answers 411 (HTTP_LENGTH_REQUIRED);
  a malformed or conflicting Content-Length 400.

**Architecture Invariant:** one process owns the data directory, and it owns
exactly one chDB session, used under one lock. Requests are served by
threads, queries run one at a time.

**Architecture Invariant:** nothing a client sends changes the shared session
for the next client. `database` and settings are applied per request and
reset afterwards; client `SET` and `USE` statements are accepted and ignored,
as a ClickHouse server does for HTTP requests without `session_id`; settings
that cannot be reset (`readonly`) are never set on the session.

The `database` parameter: chDB 26.9 keeps `USE db` in the session (older
notes say it does not; it does now), so each request runs `USE <database>`
under the lock before its query. Unqualified names therefore resolve in the
requested database for every statement kind, with no SQL rewriting.

Security: queries run with this process's privileges (`file()`, `INFILE`,
`INTO OUTFILE` reach the whole file system). Bind to localhost, set a password.

Not implemented: HTTP sessions (`session_id` is
ignored), progress headers (`send_progress_in_http_headers`).
"""

import argparse
import base64
import dataclasses
import functools
import hmac
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qsl, urlsplit

import form_data
import http_compression
import ingest

PASSWORD_ENV = "CHDB_HTTP_PASSWORD"
# A request body as sent (possibly compressed) goes to a temporary file and may
# be at most this large; decoded (content encoding, compressed blocks) at most
# MAX_DECODED_BODY_BYTES. Only max_query_size bytes of it are ever read into
# memory as query text; the rest is INSERT data, inserted from the file.
MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_DECODED_BODY_BYTES = 1024 * 1024 * 1024
# ClickHouse's default for the max_query_size setting.
DEFAULT_MAX_QUERY_SIZE = 256 * 1024
# A form field (a parameter value, the query) read into memory at most.
MAX_FORM_FIELD_BYTES = 16 * 1024 * 1024
MAX_CHUNK_LINE_BYTES = 4096
MAX_TRAILER_LINES = 64
READ_PIECE_BYTES = 1024 * 1024
# Idle keep-alive connections are closed after this many seconds. Larger than
# hyper's default pool idle timeout (90 s), so rotel closes first and never
# sends on a connection we are closing.
SOCKET_TIMEOUT_SECONDS = 300
LOG_QUERY_CHARS = 120

# ClickHouse error codes used by this server itself.
CODE_SYNTAX_ERROR = 62
CODE_BAD_ARGUMENTS = 36
CODE_UNKNOWN_FORMAT = 73
CODE_READONLY = 164
CODE_QUERY_IS_TOO_LARGE = 229
CODE_HTTP_LENGTH_REQUIRED = 381
CODE_UNKNOWN_COMPRESSION_METHOD = 89
CODE_CANNOT_READ_ALL_DATA = 33
CODE_UNKNOWN_SETTING = 115
CODE_AUTHENTICATION_FAILED = 516
CODE_UNKNOWN_EXCEPTION = 1002

AUTH_FAILED_MESSAGE = (
    "Code: 516. DB::Exception: {user}: Authentication failed: password is incorrect, "
    "or there is no user with such name. (AUTHENTICATION_FAILED)"
)

# HTTP status per ClickHouse error code: ClickHouse's own table
# (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp), code for code. Everything
# not listed is 500, as there.
_STATUS_BY_CODE = {
    194: 401,  # REQUIRED_PASSWORD
    192: 403,  # UNKNOWN_USER
    193: 403,  # WRONG_PASSWORD
    516: 403,  # AUTHENTICATION_FAILED
    512: 403,  # SET_NON_GRANTED_ROLE
    497: 403,  # ACCESS_DENIED
    229: 413,  # QUERY_IS_TOO_LARGE
    48: 501,  # NOT_IMPLEMENTED
    209: 503,  # SOCKET_TIMEOUT
    76: 503,  # CANNOT_OPEN_FILE
    439: 503,  # CANNOT_SCHEDULE_TASK
    381: 411,  # HTTP_LENGTH_REQUIRED
    159: 408,  # TIMEOUT_EXCEEDED
    779: 415,  # UNSUPPORTED_MEDIA_TYPE
}
_BAD_REQUEST_CODES = {
    36,  # BAD_ARGUMENTS
    427,  # CANNOT_COMPILE_REGEXP
    6,  # CANNOT_PARSE_TEXT
    25,  # CANNOT_PARSE_ESCAPE_SEQUENCE
    26,  # CANNOT_PARSE_QUOTED_STRING
    38,  # CANNOT_PARSE_DATE
    41,  # CANNOT_PARSE_DATETIME
    72,  # CANNOT_PARSE_NUMBER
    441,  # CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING
    675,  # CANNOT_PARSE_IPV4
    676,  # CANNOT_PARSE_IPV6
    27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    376,  # CANNOT_PARSE_UUID
    15,  # DUPLICATE_COLUMN
    44,  # ILLEGAL_COLUMN
    37,  # UNKNOWN_ELEMENT_IN_AST
    123,  # UNKNOWN_TYPE_OF_AST_NODE
    8,  # THERE_IS_NO_COLUMN
    167,  # TOO_DEEP_AST
    168,  # TOO_BIG_AST
    223,  # UNEXPECTED_AST_STRUCTURE
    62,  # SYNTAX_ERROR
    117,  # INCORRECT_DATA
    53,  # TYPE_MISMATCH
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
}
_NOT_FOUND_CODES = {
    60,  # UNKNOWN_TABLE
    46,  # UNKNOWN_FUNCTION
    47,  # UNKNOWN_IDENTIFIER
    50,  # UNKNOWN_TYPE
    56,  # UNKNOWN_STORAGE
    81,  # UNKNOWN_DATABASE
    115,  # UNKNOWN_SETTING
    152,  # UNKNOWN_DIRECTION_OF_SORTING
    63,  # UNKNOWN_AGGREGATE_FUNCTION
    73,  # UNKNOWN_FORMAT
    336,  # UNKNOWN_DATABASE_ENGINE
    78,  # UNKNOWN_TYPE_OF_QUERY
    511,  # UNKNOWN_ROLE
}


def http_status_for_code(code: int) -> int:
    if code in _STATUS_BY_CODE:
        return _STATUS_BY_CODE[code]
    if code in _BAD_REQUEST_CODES:
        return 400
    if code in _NOT_FOUND_CODES:
        return 404
    return 500


class QueryError(Exception):
    """A ClickHouse-style failure: `Code: N. DB::Exception: ...`."""

    def __init__(self, code: int, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else http_status_for_code(code)

    @classmethod
    def from_engine_message(cls, text: str) -> "QueryError":
        text = (text or "").strip()
        match = re.search(r"Code: (\d+)\.", text)
        if match is None:
            return cls(CODE_UNKNOWN_EXCEPTION, f"Code: {CODE_UNKNOWN_EXCEPTION}. DB::Exception: {text or 'unknown error'}")
        return cls(int(match.group(1)), text[match.start():])

    @classmethod
    def ours(cls, code: int, name: str, text: str, status: Optional[int] = None) -> "QueryError":
        return cls(code, f"Code: {code}. DB::Exception: {text}. ({name})", status)


class MalformedRequest(Exception):
    """The HTTP framing itself is broken: answer 400 and close the connection."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------
# A small SQL lexer: just enough to find the first keyword, the FORMAT clause,
# where INSERT data starts, and multi-statements. Strings, quoted identifiers
# and comments are skipped, so keywords inside them do not count.

_TOKEN_RE = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>--[^\n]*|\#[^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<string>'(?:[^'\\]|\\.|'')*+(?:'|\Z))
    | (?P<quoted>"(?:[^"\\]|\\.|"")*+(?:"|\Z)|`(?:[^`\\]|\\.|``)*+(?:`|\Z))
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<number>[0-9][0-9A-Za-z_.]*)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)

_READ_ONLY_KEYWORDS = {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "(", "SET", "USE"}


@dataclass
class Analysis:
    """What the lexer learned about one query text."""

    keyword: str = ""  # first keyword, upper case ('' for an empty query)
    output_format: Optional[str] = None  # trailing `FORMAT X` of a non-INSERT query
    multi_statement: bool = False
    # For `INSERT ... FORMAT X <data>`:
    insert_format: Optional[str] = None
    head_end: int = 0  # offset of the FORMAT keyword
    settings_at: Optional[int] = None  # offset of a top-level SETTINGS before FORMAT
    data_start: int = 0  # offset where the data begins


# A collector sends the same INSERT text with every request, and lexing it
# in Python was the largest part of such a request's CPU in chdb-http: short
# texts' analyses are remembered (each caller gets its own copy).
_ANALYSIS_CACHE_TEXT_CHARS = 4096


def analyze(text: str) -> Analysis:
    """Lex `text` (for INSERT data, lexing stops where the data starts)."""
    if len(text) <= _ANALYSIS_CACHE_TEXT_CHARS:
        return dataclasses.replace(_analyze_cached(text))
    return _analyze(text)


@functools.lru_cache(maxsize=256)
def _analyze_cached(text: str) -> Analysis:
    return _analyze(text)


def _analyze(text: str) -> Analysis:
    result = Analysis()
    depth = 0
    after_semicolon = False
    pending_format_at = None  # offset of a top-level FORMAT keyword just seen
    format_candidate = None  # name in a FORMAT clause, confirmed when the query ends
    settings_after_format = False
    insert_has_infile = False
    insert_has_query = False  # INSERT ... VALUES / SELECT: no data part to split
    for match in _TOKEN_RE.finditer(text):
        kind = match.lastgroup
        if kind in ("space", "comment"):
            continue
        token = match.group()
        if after_semicolon:
            result.multi_statement = True
            break
        if not result.keyword:
            result.keyword = token.upper() if kind == "word" else token
        if kind == "word" and depth == 0:
            upper = token.upper()
            if pending_format_at is not None:
                if result.keyword == "INSERT" and not insert_has_infile and not insert_has_query:
                    result.insert_format = token
                    result.head_end = pending_format_at
                    result.data_start = _insert_data_start(text, match.end())
                    return result
                format_candidate = token
                settings_after_format = False
                pending_format_at = None
                continue
            if upper == "FORMAT":
                pending_format_at = match.start()
                continue
            if format_candidate is not None and not settings_after_format:
                if upper == "SETTINGS":
                    settings_after_format = True  # `FORMAT X SETTINGS ...` is allowed
                else:
                    format_candidate = None  # `FORMAT` was a name, not the last clause
            if result.keyword == "INSERT":
                if upper == "SETTINGS" and result.settings_at is None:
                    result.settings_at = match.start()
                elif upper == "INFILE":
                    insert_has_infile = True
                elif upper in ("VALUES", "SELECT", "WITH"):
                    insert_has_query = True
            continue
        pending_format_at = None
        if kind != "punct":
            continue
        if token in "([{":
            depth += 1
        elif token in ")]}":
            depth = max(0, depth - 1)
        elif token == ";" and depth == 0:
            after_semicolon = True
    if format_candidate is not None:
        result.output_format = format_candidate
    return result


def _insert_data_start(text: str, pos: int) -> int:
    # ClickHouse (ParserInsertQuery): data starts after the first newline if
    # there is one, or after all the whitespace characters otherwise.
    end = len(text)
    while pos < end and text[pos] in " \t\f":
        pos += 1
    if pos < end and text[pos] == "\r":
        pos += 1
    if pos < end and text[pos] == "\n":
        pos += 1
    return pos


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---------------------------------------------------------------------------
# Output formats and headers.

_UNSUPPORTED_OUTPUT_FORMATS = {"dataframe", "datastore", "arrowtable", "debug"}


def content_type_for(fmt: str) -> str:
    f = fmt.lower()
    if f.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if f.startswith("csv"):
        return "text/csv; charset=UTF-8; header=" + ("present" if "withnames" in f else "absent")
    if f.startswith("json") and ("eachrow" in f or f in ("jsonlines", "jsonl")):
        return "application/x-ndjson; charset=UTF-8"
    if f.startswith("json"):
        return "application/json; charset=UTF-8"
    if f == "xml":
        return "application/xml; charset=UTF-8"
    if f.startswith(("rowbinary", "native", "parquet", "arrow", "orc", "avro", "protobuf", "capnproto", "msgpack", "bson", "npy")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


# URL parameters that are not settings, or settings we deliberately do not
# apply. `readonly` is honoured by refusing modifying queries, never set on
# the shared session (chDB cannot reset it afterwards). Inserts are always
# synchronous here, so the async_insert family is ignored.
_NON_SETTING_PARAMS = {
    "query",
    "database",
    "default_format",
    "user",
    "password",
    "quota_key",
    "query_id",
    "session_id",
    "session_timeout",
    "session_check",
    "wait_end_of_query",
    "buffer_size",
    "compress",
    "decompress",
    "enable_http_compression",
    "http_zlib_compression_level",
    "http_native_compression_disable_checksumming_on_decompress",
    "send_progress_in_http_headers",
    "http_headers_progress_interval_ms",
    "add_http_cors_header",
    "client_protocol_version",
    "stacktrace",
    "role",
    "readonly",
    "async_insert",
    "wait_for_async_insert",
    "wait_for_async_insert_timeout",
    "async_insert_deduplicate",
    "async_insert_busy_timeout_ms",
    "async_insert_max_data_size",
}
_SETTING_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ---------------------------------------------------------------------------
# The engine: one chDB session, one lock.


@dataclass
class EngineResult:
    body: bytes
    rows_read: int = 0
    bytes_read: int = 0
    rows_written: int = 0
    bytes_written: int = 0
    elapsed_ns: int = 0


def _metric(result, name: str) -> int:
    try:
        return int(getattr(result, name)())
    except Exception:
        return 0


class Engine:
    def __init__(self, session_class, data_dir: str, log):
        self._lock = threading.Lock()
        self._session = session_class(data_dir)
        self._log = log
        self._warned_settings = set()
        self.timezone = "UTC"
        tz = self._query_locked("SELECT timezone()", "TabSeparated").bytes().decode().strip()
        if tz:
            self.timezone = tz

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def execute(self, sql: str, database: str, settings, output_format: str, params, external_tables=()) -> EngineResult:
        """Run one query with `database` current and `settings` applied.

        chDB 26.9 keeps `USE` and `SET` in the session (a ClickHouse server
        would not, between HTTP requests), so every request first selects its
        database and applies its settings with `SET`, and resets them with
        `SET x = DEFAULT` afterwards, all under the lock. This works for every
        statement kind (no SQL rewriting). An unknown setting is ignored with
        a warning; a bad value fails the query like ClickHouse does.

        `external_tables` (ExternalTable) become temporary tables for this
        query only, created from their files and dropped afterwards.
        """
        with self._lock:
            if self._session is None:
                raise QueryError.ours(CODE_UNKNOWN_EXCEPTION, "UNKNOWN_EXCEPTION", "Server is shutting down", 503)
            self._query_locked(f"USE {quote_identifier(database)}")
            applied = []
            created = []
            try:
                for table in external_tables:
                    name = quote_identifier(table.name)
                    self._query_locked(f"CREATE TEMPORARY TABLE {name} ({table.structure}) ENGINE = Memory")
                    created.append(name)
                    self._query_locked(f"INSERT INTO {name} FROM INFILE {quote_string(table.path)} FORMAT {table.format}")
                for name, value in settings:
                    try:
                        self._query_locked(f"SET {name} = {quote_string(value)}")
                    except QueryError as error:
                        if error.code != CODE_UNKNOWN_SETTING:
                            raise
                        if name not in self._warned_settings:
                            self._warned_settings.add(name)
                            self._log(f"Ignoring URL parameter `{name}`: chDB does not know this setting")
                        continue
                    applied.append(name)
                started = time.monotonic_ns()
                result = self._query_locked(sql, output_format, params)
                elapsed = time.monotonic_ns() - started
            finally:
                for name in created:
                    try:
                        self._query_locked(f"DROP TEMPORARY TABLE IF EXISTS {name}")
                    except QueryError as error:
                        self._log(f"Could not drop external table {name}: {error.message}")
                for name in applied:
                    try:
                        self._query_locked(f"SET {name} = DEFAULT")
                    except QueryError as error:
                        self._log(f"Could not reset setting `{name}`: {error.message}")
            body = result.bytes() if result is not None else b""
            return EngineResult(
                body=body or b"",
                rows_read=_metric(result, "rows_read"),
                bytes_read=_metric(result, "bytes_read"),
                rows_written=_metric(result, "rows_written"),
                bytes_written=_metric(result, "bytes_written"),
                elapsed_ns=elapsed,
            )

    def _query_locked(self, sql: str, fmt: str = "TabSeparated", params=None):
        # chDB reports failures in two ways: it raises (ChdbError/RuntimeError,
        # message `Code: N. DB::Exception: ...`), or it returns a result whose
        # has_error() is true. Both become QueryError.
        try:
            if params:
                result = self._session.query(sql, fmt, params=params)
            else:
                result = self._session.query(sql, fmt)
        except Exception as exc:  # noqa: BLE001 - chDB raises several types
            raise QueryError.from_engine_message(str(exc)) from None
        if result is not None and hasattr(result, "has_error") and result.has_error():
            raise QueryError.from_engine_message(result.error_message())
        return result


# ---------------------------------------------------------------------------
# HTTP.


@dataclass
class Config:
    user: str
    password: Optional[str]
    tmp_dir: str
    display_name: str


@dataclass
class ExternalTable:
    """A table sent with the query as a file part of a form (external data)."""

    name: str
    structure: str  # column list, `a UInt32, b String`
    format: str
    path: str


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict


def redact(text: str) -> str:
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1[redacted]", text)


def one_line(text: str, limit: int = LOG_QUERY_CHARS) -> str:
    return re.sub(r"\s+", " ", text).strip()[:limit]


def query_preview(text: str) -> str:
    """The query for the log: leading comment lines dropped, whitespace folded."""
    text = re.sub(r"\A(?:\s*--[^\n]*(?:\n|\Z))+", "", text[: 64 * 1024])
    return one_line(text)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chdb-http"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_SECONDS
    # TCP_NODELAY, as ClickHouse sets it: an answer goes out as two writes
    # (headers, then body), and with Nagle's algorithm the body waited for
    # the client's delayed ACK of the headers, 40 ms on Linux, on every
    # query (the bench's trace lookups: SELECT 1 took 53 ms at the client
    # for 6 ms in the engine).
    disable_nagle_algorithm = True

    # Set by make_server.
    engine: Engine = None
    config: Config = None
    committer: Optional[ingest.GroupCommitter] = None
    wait_for_async_insert = "1"  # the server's default, as in a ClickHouse profile

    def setup(self):
        ingest.name_os_thread("chdb-req")  # one thread per connection
        super().setup()

    # -- logging ----------------------------------------------------------

    def log_request(self, code="-", size="-"):
        pass  # one line per request is written by _finish_log instead

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        sys.stderr.write("chdb-http: " + redact(format % args) + "\n")

    def _finish_log(self, status: int, started: float, preview: str) -> None:
        duration_ms = (time.monotonic() - started) * 1000
        path = urlsplit(self.path).path if self.path else "-"
        line = f"{self.command} {path} {status} {duration_ms:.1f}ms {query_preview(preview)}"
        sys.stderr.write("chdb-http: " + redact(line).rstrip() + "\n")

    # -- entry points -----------------------------------------------------

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_HEAD(self):
        self._handle()

    def _handle(self):
        started = time.monotonic()
        self._preview = ""
        self._body_consumed = False
        self._temp_paths = []
        try:
            try:
                response = self._route()
            finally:
                for path in self._temp_paths:
                    _unlink(path)
        except MalformedRequest as error:
            self.close_connection = True
            status = 413 if error.code == CODE_QUERY_IS_TOO_LARGE else 400
            response = self._error_response(QueryError.ours(error.code, _code_name(error.code), error.message, status))
        except QueryError as error:
            response = self._error_response(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self._finish_log(499, started, self._preview)
            return
        except Exception as exc:  # noqa: BLE001 - never crash the connection thread
            self.log_message("Internal error: %s", "".join(traceback.format_exception_only(type(exc), exc)).strip())
            response = self._error_response(
                QueryError.ours(CODE_UNKNOWN_EXCEPTION, "UNKNOWN_EXCEPTION", f"Internal error in chdb-http: {exc!r}", 500)
            )
        if self._has_body() and not self._body_consumed and not self.close_connection:
            # Answering before the body was read (an error): read it to its
            # end first, as ClickHouse does, so the client sees the answer and
            # not a connection closed under its upload.
            try:
                self._read_body(lambda _piece: None)
            except (MalformedRequest, QueryError, OSError):
                self.close_connection = True
        try:
            self._send(response)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        self._finish_log(response.status, started, self._preview)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        headers = {
            "X-ClickHouse-Server-Display-Name": self.config.display_name,
            "Content-Length": str(len(response.body)),
        }
        headers.update(response.headers)
        if self.close_connection:
            headers["Connection"] = "close"
        else:
            headers["Connection"] = "Keep-Alive"
            headers["Keep-Alive"] = f"timeout={SOCKET_TIMEOUT_SECONDS}"
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)
        self.wfile.flush()

    def _error_response(self, error: QueryError) -> Response:
        body = error.message.rstrip("\n") + "\n"
        return Response(
            error.status,
            body.encode("utf-8", "replace"),
            {
                "Content-Type": "text/plain; charset=UTF-8",
                "X-ClickHouse-Exception-Code": str(error.code),
            },
        )

    # -- routing ----------------------------------------------------------

    def _route(self):
        url = urlsplit(self.path)
        params = parse_qsl(url.query, keep_blank_values=True)
        param = dict(params)  # last value wins, like ClickHouse
        ok = Response(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
        if url.path in ("/ping", "/replicas_status"):
            return ok
        if url.path != "/":
            body = f"There is no handle {url.path}\n\nUse / or /ping for health checks.\n"
            return Response(404, body.encode(), {"Content-Type": "text/plain; charset=UTF-8"})
        if "query" not in param and not self._has_body() and self.command in ("GET", "HEAD"):
            return ok
        self._preview = param.get("query", "")

        self._check_framing()
        body_path = self._spool_body()
        self._authenticate(param)
        body_path = self._decode_body(param, body_path)
        external_files = []
        content_type = self.headers.get("Content-Type") or ""
        try:
            boundary = form_data.boundary_of(content_type)
        except form_data.FormError as error:
            raise QueryError.ours(CODE_BAD_ARGUMENTS, "BAD_ARGUMENTS", f"Cannot parse the request body: {error}") from None
        if boundary is not None:
            # Form fields are parameters like the URL's (query, param_*,
            # settings); the body holds no query text then.
            fields, external_files = self._form_fields(body_path, boundary)
            params = params + fields
            param = dict(params)
            body_path = None
            self._preview = param.get("query", "")

        database = param.get("database") or self.headers.get("X-ClickHouse-Database") or "default"
        default_format = param.get("default_format") or self.headers.get("X-ClickHouse-Format") or "TabSeparated"
        if default_format.lower() in _UNSUPPORTED_OUTPUT_FORMATS:
            raise QueryError.ours(CODE_UNKNOWN_FORMAT, "UNKNOWN_FORMAT", f"Unknown output format {default_format}")
        query_id = param.get("query_id") or str(uuid.uuid4())
        read_only = self.command in ("GET", "HEAD") or param.get("readonly", "0") not in ("", "0")
        query_params = {name[len("param_"):]: value for name, value in params if name.startswith("param_")}
        external_tables = [_external_table(name, path, param) for name, path in external_files]
        external_params = {f"{t.name}_{suffix}" for t in external_tables for suffix in ("format", "structure", "types")}
        settings = []
        for name, value in params:
            if name in _NON_SETTING_PARAMS or name.startswith("param_") or name.startswith("async_insert"):
                continue
            if name in external_params:
                continue
            if not _SETTING_NAME_RE.fullmatch(name):
                raise QueryError.ours(CODE_BAD_ARGUMENTS, "BAD_ARGUMENTS", f"Invalid URL parameter name {name!r}")
            settings.append((name, value))

        max_query_size = DEFAULT_MAX_QUERY_SIZE
        if param.get("max_query_size", "").isdigit():
            max_query_size = int(param["max_query_size"])
        plan = self._plan(param.get("query"), body_path, max_query_size)
        self._preview = plan.preview
        try:
            if plan.keyword == "":
                raise QueryError.ours(CODE_SYNTAX_ERROR, "SYNTAX_ERROR", "Empty query")
            if plan.multi_statement:
                raise QueryError.ours(CODE_SYNTAX_ERROR, "SYNTAX_ERROR", "Multi-statements are not allowed")
            if read_only and plan.keyword not in _READ_ONLY_KEYWORDS:
                raise QueryError.ours(
                    CODE_READONLY,
                    "READONLY",
                    "Cannot execute query in readonly mode. For queries over HTTP, method GET implies readonly. "
                    "You should use method POST for modifying queries",
                )
            headers = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": self.engine.timezone}
            if plan.keyword in ("SET", "USE"):
                # Stateless like a ClickHouse HTTP request without session_id:
                # accepted, and forgotten at the end of the request.
                headers["Content-Type"] = "text/plain; charset=UTF-8"
                headers["X-ClickHouse-Summary"] = _summary(EngineResult(b""))
                return Response(200, b"", headers)
            if plan.data_path is not None:
                result = self._insert(plan, database, settings, query_params)
                headers["Content-Type"] = "text/plain; charset=UTF-8"
            else:
                result = self.engine.execute(plan.sql, database, settings, default_format, query_params, external_tables)
                effective = plan.output_format or default_format
                headers["Content-Type"] = content_type_for(effective)
                headers["X-ClickHouse-Format"] = effective
            headers["X-ClickHouse-Summary"] = _summary(result)
            return Response(200, self._encode_result(result.body, param, headers), headers)
        finally:
            plan.cleanup()

    def _insert(self, plan: "Plan", database: str, settings, query_params) -> EngineResult:
        """An INSERT whose data is in a file; grouped with concurrent ones when it can be (ingest.py).

        An asynchronous insert that does not wait (`async_insert=1`, and
        `wait_for_async_insert=0` in the URL or as the server's default) is
        answered once it is in the spool, when the server has one.
        """
        if self.committer is None or not ingest.GroupCommitter.groupable(plan._format, bool(query_params)):
            return self.engine.execute(plan.insert_sql(), database, settings, "TabSeparated", query_params)
        template = plan.insert_sql(ingest.PATH_MARKER)
        insert = grouped_insert(self.engine, database, settings, template, plan.data_path)
        param = dict(parse_qsl(urlsplit(self.path).query))
        no_wait = (
            param.get("async_insert", "0") == "1"
            and param.get("wait_for_async_insert", self.wait_for_async_insert) == "0"
        )
        try:
            if no_wait and self.committer.spool_dir is not None:
                record = {"database": database, "settings": settings, "template": template}
                self.committer.spool(insert, record)
                return EngineResult(b"")
            return self.committer.submit(insert)
        except ingest.Busy as busy:
            raise QueryError(busy.code, busy.message, 503) from None

    def _encode_result(self, body: bytes, param: dict, headers: dict) -> bytes:
        """`compress=1` wraps the result in ClickHouse's compressed blocks (LZ4);
        with `enable_http_compression=1` an `Accept-Encoding` ClickHouse knows
        is applied on top, as ClickHouse does."""
        if param.get("compress", "0") not in ("", "0"):
            body = http_compression.compress_blocks(body)
        if param.get("enable_http_compression", "0") in ("", "0"):
            return body
        encoding = http_compression.choose_response_encoding(self.headers.get("Accept-Encoding") or "")
        if encoding is None:
            return body
        headers["Content-Encoding"] = encoding
        return http_compression.encode_content(encoding, body)

    # -- request body -----------------------------------------------------

    def _has_body(self) -> bool:
        if self.headers.get("Transfer-Encoding"):
            return True
        length = self.headers.get("Content-Length")
        return bool(length) and length.strip() != "0"

    def _read_body(self, sink) -> int:
        """Read the request body into `sink(bytes)`; returns its size."""
        transfer_encoding = self.headers.get("Transfer-Encoding")
        if transfer_encoding:
            codings = [c.strip().lower() for c in transfer_encoding.split(",") if c.strip()]
            if codings != ["chunked"]:
                self.close_connection = True
                raise MalformedRequest(CODE_BAD_ARGUMENTS, f"Unsupported Transfer-Encoding: {transfer_encoding}")
            total = self._read_chunked(sink)
            self._body_consumed = True
            return total
        length_text = self.headers.get("Content-Length")
        if not length_text:
            self._body_consumed = True
            return 0
        if not length_text.strip().isdigit():
            self.close_connection = True
            raise MalformedRequest(CODE_BAD_ARGUMENTS, f"Invalid Content-Length: {length_text!r}")
        length = int(length_text.strip())
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise MalformedRequest(
                CODE_QUERY_IS_TOO_LARGE, f"Request body of {length} bytes is larger than the limit of {MAX_BODY_BYTES} bytes"
            )
        self._read_exactly(length, sink)
        self._body_consumed = True
        return length

    def _read_exactly(self, length: int, sink) -> None:
        remaining = length
        while remaining > 0:
            piece = self.rfile.read(min(remaining, READ_PIECE_BYTES))
            if not piece:
                self.close_connection = True
                raise MalformedRequest(
                    CODE_CANNOT_READ_ALL_DATA, f"Unexpected end of request body: {length - remaining} of {length} bytes read"
                )
            sink(piece)
            remaining -= len(piece)

    def _read_chunked(self, sink) -> int:
        total = 0
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE_BYTES + 1)
            if not line:
                self.close_connection = True
                raise MalformedRequest(CODE_CANNOT_READ_ALL_DATA, "Unexpected end of chunked request body")
            if len(line) > MAX_CHUNK_LINE_BYTES or not line.endswith(b"\n"):
                self.close_connection = True
                raise MalformedRequest(CODE_BAD_ARGUMENTS, "Chunk size line is too long")
            size_text = line.split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size_text):
                self.close_connection = True
                raise MalformedRequest(CODE_BAD_ARGUMENTS, f"Invalid chunk size {size_text[:32]!r} in chunked request body")
            size = int(size_text, 16)
            if size == 0:
                for _ in range(MAX_TRAILER_LINES):
                    trailer = self.rfile.readline(MAX_CHUNK_LINE_BYTES + 1)
                    if not trailer:
                        self.close_connection = True
                        raise MalformedRequest(CODE_CANNOT_READ_ALL_DATA, "Unexpected end of chunked request body")
                    if trailer in (b"\r\n", b"\n"):
                        return total
                self.close_connection = True
                raise MalformedRequest(CODE_BAD_ARGUMENTS, "Too many trailer lines in chunked request body")
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise MalformedRequest(
                    CODE_QUERY_IS_TOO_LARGE, f"Request body is larger than the limit of {MAX_BODY_BYTES} bytes"
                )
            self._read_exactly(size, sink)
            end = self.rfile.readline(3)
            if end not in (b"\r\n", b"\n"):
                self.close_connection = True
                raise MalformedRequest(CODE_BAD_ARGUMENTS, "Chunk data is not followed by CRLF in chunked request body")

    # -- query planning ---------------------------------------------------

    def _plan(self, url_query: Optional[str], body_path: Optional[str], max_query_size: int) -> "Plan":
        """Decide what to run: a query text, or an INSERT whose data is in a file.

        `body_path` is the decoded request body (or None). Only the first
        `max_query_size` bytes of URL query and body are read as query text.
        """
        tmp_dir = self.config.tmp_dir
        if url_query is not None:
            analysis = analyze(url_query)
            inline_data = url_query[analysis.data_start:] if analysis.insert_format else ""
            if analysis.insert_format and not inline_data.strip() and not analysis.multi_statement:
                # The common case (rotel, the clickhouse crate): the body is
                # the data, already in a file.
                plan = Plan.for_insert(url_query, analysis, tmp_dir)
                if body_path is not None:
                    os.replace(body_path, plan.data_path)
                return plan
            # ClickHouse concatenates the URL query, a newline and the body.
            prefix = url_query.encode("utf-8") + (b"\n" if body_path is not None else b"")
            return Plan.from_source(prefix, body_path, max_query_size, tmp_dir)
        return Plan.from_source(b"", body_path, max_query_size, tmp_dir)

    def _new_temp_path(self, kind: str) -> str:
        fd, path = tempfile.mkstemp(prefix=f"{kind}-", suffix=".body", dir=self.config.tmp_dir)
        os.close(fd)
        self._temp_paths.append(path)
        return path

    def _check_framing(self) -> None:
        """Header checks ClickHouse (Poco) makes before reading a body."""
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1 and len(set(v.strip() for v in lengths)) > 1:
            self.close_connection = True
            raise MalformedRequest(CODE_BAD_ARGUMENTS, "Conflicting Content-Length headers")
        if lengths and not lengths[0].strip().isdigit():
            self.close_connection = True
            raise MalformedRequest(CODE_BAD_ARGUMENTS, f"Invalid Content-Length: {lengths[0][:64]!r}")
        if lengths and self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise MalformedRequest(CODE_BAD_ARGUMENTS, "Both Content-Length and Transfer-Encoding are set")
        if self.command == "POST" and not lengths and not self.headers.get("Transfer-Encoding"):
            raise QueryError.ours(
                CODE_HTTP_LENGTH_REQUIRED,
                "HTTP_LENGTH_REQUIRED",
                "The Transfer-Encoding is not chunked and there is no Content-Length header for POST request",
            )

    def _spool_body(self) -> Optional[str]:
        """The request body as sent, in a temporary file (None when empty)."""
        if not self._has_body():
            self._body_consumed = True
            return None
        path = self._new_temp_path("request")
        with open(path, "wb") as sink:
            size = self._read_body(sink.write)
        return path if size else None

    def _decode_body(self, param: dict, body_path: Optional[str]) -> Optional[str]:
        """Undoes the request's Content-Encoding, then `decompress=1` blocks."""
        encoding_header = (self.headers.get("Content-Encoding") or "identity").strip()
        encoding = http_compression.known_encoding(encoding_header)
        if encoding is None:
            raise QueryError.ours(
                CODE_UNKNOWN_COMPRESSION_METHOD,
                "UNKNOWN_COMPRESSION_METHOD",
                f"Unknown compression method '{one_line(encoding_header, 64)}' in Content-Encoding",
            )
        blocks = param.get("decompress", "0") not in ("", "0")
        if body_path is None:
            return None
        verify = param.get("http_native_compression_disable_checksumming_on_decompress", "0") in ("", "0")
        try:
            if encoding != "identity":
                decoded = self._new_temp_path("decoded")
                with open(body_path, "rb") as source, open(decoded, "wb") as sink:
                    http_compression.decode_content(encoding, source, sink.write, MAX_DECODED_BODY_BYTES)
                body_path = decoded
            if blocks:
                decoded = self._new_temp_path("decompressed")
                with open(body_path, "rb") as source, open(decoded, "wb") as sink:
                    http_compression.decompress_blocks(source, sink.write, verify, MAX_DECODED_BODY_BYTES)
                body_path = decoded
        except http_compression.TransferError as error:
            raise QueryError.ours(error.code, error.name, error.text) from None
        return body_path if os.path.getsize(body_path) else None

    def _form_fields(self, body_path: Optional[str], boundary: str):
        """The fields of a multipart/form-data body as (name, value) pairs, and
        its file parts (external data) as (table name, path of a copy)."""
        if body_path is None:
            return [], []
        try:
            with open(body_path, "rb") as source:
                parts = form_data.parse(source, boundary, self.config.tmp_dir)
            try:
                fields, files = [], []
                for part in parts:
                    if part.filename is None:
                        fields.append((part.name, part.text(MAX_FORM_FIELD_BYTES)))
                        continue
                    path = self._new_temp_path("external")
                    with open(path, "wb") as sink:
                        part.file.seek(0)
                        shutil.copyfileobj(part.file, sink, 1024 * 1024)
                    files.append((part.name, path))
                return fields, files
            finally:
                for part in parts:
                    part.close()
        except form_data.FormError as error:
            raise QueryError.ours(CODE_BAD_ARGUMENTS, "BAD_ARGUMENTS", f"Cannot parse the request body: {error}") from None

    # -- auth and compression -----------------------------------------------

    def _authenticate(self, param: dict) -> None:
        """Accept X-ClickHouse-User/Key headers, HTTP basic auth, or user/password URL parameters.

        Precedence: headers, then basic auth, then URL parameters. No
        credentials at all answers 401; wrong ones 403 (ClickHouse answers
        403 for AUTHENTICATION_FAILED). Both carry code 516.
        """
        expected_password = self.config.password
        if expected_password is None:
            return
        user = password = None
        if self.headers.get("X-ClickHouse-User") is not None or self.headers.get("X-ClickHouse-Key") is not None:
            user = self.headers.get("X-ClickHouse-User", "default")
            password = self.headers.get("X-ClickHouse-Key", "")
        elif (self.headers.get("Authorization") or "").lower().startswith("basic "):
            try:
                decoded = base64.b64decode(self.headers["Authorization"][6:].strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                decoded = ""
            user, _, password = decoded.partition(":")
        elif "user" in param or "password" in param:
            user = param.get("user", "default")
            password = param.get("password", "")
        if user is None:
            raise QueryError(CODE_AUTHENTICATION_FAILED, AUTH_FAILED_MESSAGE.format(user="default"), 401)
        user_ok = hmac.compare_digest(user.encode("utf-8"), self.config.user.encode("utf-8"))
        password_ok = hmac.compare_digest(password.encode("utf-8"), expected_password.encode("utf-8"))
        if not (user_ok and password_ok):
            raise QueryError(CODE_AUTHENTICATION_FAILED, AUTH_FAILED_MESSAGE.format(user=one_line(user, 64)), 403)


def _summary(result: EngineResult) -> str:
    return json.dumps(
        {
            "read_rows": str(result.rows_read),
            "read_bytes": str(result.bytes_read),
            "written_rows": str(result.rows_written),
            "written_bytes": str(result.bytes_written),
            "total_rows_to_read": "0",
            "result_rows": "0",
            "result_bytes": str(len(result.body)),
            "elapsed_ns": str(result.elapsed_ns),
        },
        separators=(",", ":"),
    )


def _code_name(code: int) -> str:
    return {
        CODE_BAD_ARGUMENTS: "BAD_ARGUMENTS",
        CODE_QUERY_IS_TOO_LARGE: "QUERY_IS_TOO_LARGE",
        CODE_CANNOT_READ_ALL_DATA: "CANNOT_READ_ALL_DATA",
    }.get(code, "UNKNOWN_EXCEPTION")


class Plan:
    """A query to run: either `sql`, or an INSERT whose data sits in `data_path`."""

    def __init__(self):
        self.keyword = ""
        self.multi_statement = False
        self.output_format = None
        self.sql = ""
        self.preview = ""
        self.data_path: Optional[str] = None
        self._head = ""
        self._settings_at: Optional[int] = None
        self._format = ""

    @classmethod
    def for_insert(cls, text: str, analysis: Analysis, tmp_dir: str) -> "Plan":
        plan = cls()
        plan.keyword = analysis.keyword
        plan.preview = text[: analysis.data_start]
        plan._head = text[: analysis.head_end]
        plan._settings_at = analysis.settings_at
        plan._format = analysis.insert_format
        fd, plan.data_path = tempfile.mkstemp(prefix="insert-", suffix=".data", dir=tmp_dir)
        os.close(fd)
        return plan

    @classmethod
    def from_source(cls, prefix: bytes, body_path: Optional[str], max_query_size: int, tmp_dir: str) -> "Plan":
        """The query text is `prefix` followed by the file `body_path`.

        At most `max_query_size` bytes are read as query text, as ClickHouse
        does: an INSERT's data may follow them (it is copied to a file), any
        other query longer than that fails with "Max query size exceeded".
        """
        head = prefix
        body_size = 0
        if body_path is not None:
            body_size = os.path.getsize(body_path)
            with open(body_path, "rb") as body:
                head += body.read(max(0, max_query_size + 1 - len(prefix)))
        total = len(prefix) + body_size
        # latin-1 maps bytes 1:1 to characters: offsets stay byte offsets, and
        # binary INSERT data after the FORMAT clause survives the lexer.
        analysis = analyze(head[: max_query_size + 1].decode("latin-1"))
        if analysis.insert_format and not analysis.multi_statement and analysis.data_start <= max_query_size:
            head_text = _decode_query(head[: analysis.data_start])
            plan = cls.for_insert(head_text, analyze(head_text), tmp_dir)
            try:
                with open(plan.data_path, "wb") as data_file:
                    data_file.write(head[analysis.data_start :])
                    if body_path is not None:
                        with open(body_path, "rb") as body:
                            body.seek(len(head) - len(prefix))
                            shutil.copyfileobj(body, data_file, 1024 * 1024)
            except BaseException:
                plan.cleanup()
                raise
            return plan
        if total > max_query_size:
            raise QueryError.ours(
                CODE_SYNTAX_ERROR,
                "SYNTAX_ERROR",
                f"Syntax error: failed at position {max_query_size + 1}: Max query size exceeded "
                f"(the query is {total} bytes, max_query_size is {max_query_size})",
            )
        plan = cls()
        plan.keyword = analysis.keyword
        plan.multi_statement = analysis.multi_statement
        plan.output_format = analysis.output_format
        plan.sql = _decode_query(head)
        plan.preview = plan.sql
        return plan

    def insert_sql(self, data_path: Optional[str] = None) -> str:
        infile = f" FROM INFILE {quote_string(data_path or self.data_path)} "
        if self._settings_at is not None:
            head = self._head[: self._settings_at] + infile + self._head[self._settings_at:]
        else:
            head = self._head.rstrip() + infile
        return f"{head.rstrip()} FORMAT {self._format}"

    def cleanup(self) -> None:
        if self.data_path is not None:
            _unlink(self.data_path)
            self.data_path = None


def _external_table(name: str, path: str, param: dict) -> ExternalTable:
    """ClickHouse's parameters for external data: `<name>_format` (default
    TabSeparated), and `<name>_structure` (`a UInt32, b String`) or
    `<name>_types` (`UInt32,String`, columns named _1, _2, ...)."""
    if not _SETTING_NAME_RE.fullmatch(name):
        raise QueryError.ours(CODE_BAD_ARGUMENTS, "BAD_ARGUMENTS", f"Invalid external table name {one_line(name, 64)!r}")
    structure = param.get(f"{name}_structure")
    if not structure and param.get(f"{name}_types"):
        types = _split_top_level(param[f"{name}_types"])
        structure = ", ".join(f"_{i} {t}" for i, t in enumerate(types, 1))
    if not structure:
        raise QueryError.ours(
            CODE_BAD_ARGUMENTS,
            "BAD_ARGUMENTS",
            f"Neither structure nor types have been provided for external table {name}. "
            f"Use fields {name}_structure or {name}_types to do so",
        )
    fmt = param.get(f"{name}_format") or "TabSeparated"
    if not _SETTING_NAME_RE.fullmatch(fmt):
        raise QueryError.ours(CODE_UNKNOWN_FORMAT, "UNKNOWN_FORMAT", f"Unknown format {one_line(fmt, 64)}")
    return ExternalTable(name, structure, fmt, path)


def _split_top_level(text: str):
    """`UInt32,Map(String,String)` -> ['UInt32', 'Map(String,String)']."""
    items, depth, current = [], 0, []
    for char in text:
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

def grouped_insert(engine: Engine, database: str, settings, template: str, data_path: str) -> ingest.Insert:
    """An insert for the group committer; `template` has ingest.PATH_MARKER where the data file goes."""
    settings = [tuple(s) for s in settings]
    marker = quote_string(ingest.PATH_MARKER)
    # The INSERT up to its FORMAT clause, without the INFILE part (Plan.insert_sql).
    head = template.replace(f" FROM INFILE {marker} ", " ").rsplit(" FORMAT ", 1)[0].rstrip()
    target = insert_target(head)

    def run(sql, extra_settings):
        return engine.execute(sql, database, settings + extra_settings, "TabSeparated", {})

    def select_sql_for(path: str) -> Optional[str]:
        if target is None:
            return None
        types = column_types(engine, target.database or database, target.table)
        return file_select_sql(head, target, types, path)

    return ingest.Insert(
        key=(database, template, tuple(settings)),
        data_path=data_path,
        size=os.path.getsize(data_path),
        sql_for=lambda path: template.replace(marker, quote_string(path)),
        run=run,
        select_sql_for=select_sql_for,
    )


# ---------------------------------------------------------------------------
# Group commits as INSERT ... SELECT FROM file(): chDB 26.9 parses RowBinary
# into LowCardinality columns row by row, and that was most of an insert's
# cost (compose/README.md, "Log records"). Parsed as the plain type and
# converted by the INSERT, a column at a time, the same rows land with less
# than half the CPU. RowBinary writes LowCardinality(T) exactly as T, so the
# bytes mean the same thing either way.


@dataclass(frozen=True)
class InsertTarget:
    database: Optional[str]
    table: str
    columns: tuple


def insert_target(head: str) -> Optional[InsertTarget]:
    """`INSERT INTO [TABLE] [db.]table (c1, c2, ...) [SETTINGS ...]`: its table and columns.

    None for every other form (no column list, `*`, `COLUMNS(...)`, `FUNCTION`,
    a `PARTITION BY`, ...): such inserts keep `INSERT ... FROM INFILE`.
    A column may be a dotted name (`Events.Timestamp`, a Nested column)."""
    tokens = []
    for match in _TOKEN_RE.finditer(head):
        kind = match.lastgroup
        if kind in ("space", "comment"):
            continue
        tokens.append((kind, match.group()))
    words = [t.upper() if k == "word" else None for k, t in tokens]
    i = 0
    if words[i : i + 2] != ["INSERT", "INTO"]:
        return None
    i += 2
    if i < len(words) and words[i] == "TABLE":
        i += 1

    def name_at(j: int) -> Optional[str]:
        if j >= len(tokens):
            return None
        kind, text = tokens[j]
        if kind == "word":
            return text
        if kind == "quoted" and len(text) >= 2 and text[-1] == text[0]:
            return _unquote(text)
        return None

    def dotted(j: int):
        """A dotted name at `j`: (its parts, the index after it)."""
        parts = []
        while True:
            part = name_at(j)
            if part is None:
                return None, j
            parts.append(part)
            j += 1
            if j < len(tokens) and tokens[j] == ("punct", "."):
                j += 1
                continue
            return parts, j

    table, i = dotted(i)
    if table is None or len(table) > 2:
        return None
    if i >= len(tokens) or tokens[i] != ("punct", "("):
        return None
    columns = []
    i += 1
    while True:
        column, i = dotted(i)
        if column is None or i >= len(tokens):
            return None
        columns.append(".".join(column))
        if tokens[i] == ("punct", ","):
            i += 1
            continue
        if tokens[i] == ("punct", ")"):
            i += 1
            break
        return None
    if i < len(tokens) and words[i] != "SETTINGS":
        return None
    database = table[0] if len(table) == 2 else None
    return InsertTarget(database, table[-1], tuple(columns))


def _unquote(text: str) -> str:
    """A quoted identifier's name: `a``b` or "a""b" (doubled quote), and backslash escapes."""
    quote, body, out, i = text[0], text[1:-1], [], 0
    while i < len(body):
        char = body[i]
        if char == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
        elif char == quote and i + 1 < len(body) and body[i + 1] == quote:
            out.append(quote)
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def plain_type(type_name: str) -> str:
    """`type_name` with every `LowCardinality(T)` replaced by `T`, at any depth
    (`Map(LowCardinality(String), String)` -> `Map(String, String)`); quoted
    parts (`Enum8('a(' = 1)`) are left alone (the lexer skips them)."""
    out = []
    wrappers = []  # per open parenthesis: whether it is LowCardinality's
    wrapper_next = False
    for match in _TOKEN_RE.finditer(type_name):
        kind, text = match.lastgroup, match.group()
        if kind == "word" and text == "LowCardinality" and type_name.startswith("(", match.end()):
            wrapper_next = True
        elif kind == "punct" and text == "(":
            wrappers.append(wrapper_next)
            if not wrapper_next:
                out.append(text)
            wrapper_next = False
        elif kind == "punct" and text == ")" and wrappers and wrappers.pop():
            pass
        else:
            out.append(text)
    return "".join(out)


def file_select_sql(head: str, target: InsertTarget, types: dict, path: str) -> Optional[str]:
    """`head` (the INSERT up to its FORMAT clause, of `target`) reading the
    RowBinary file `path` as the columns' plain types (`types`: each column of
    the table with its type). None when a column is not in `types`: INFILE
    then gives the engine's own error."""
    if not all(column in types for column in target.columns):
        return None
    structure = ", ".join(f"c{i} {plain_type(types[c])}" for i, c in enumerate(target.columns, 1))
    return f"{head} SELECT * FROM file({quote_string(path)}, RowBinary, {quote_string(structure)})"


def column_types(engine: Engine, database: str, table: str) -> dict:
    """Each column of `database.table` with its type, from `system.columns` (read per group
    commit: a table altered since the last one is seen)."""
    result = engine.execute(
        f"SELECT name, type FROM system.columns WHERE database = {quote_string(database)} "
        f"AND table = {quote_string(table)}",
        database="system",
        settings=[],
        output_format="JSONEachRow",
        params={},
    )
    types = {}
    for line in result.body.decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            types[row["name"]] = row["type"]
    return types


def _decode_query(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise QueryError.ours(
            CODE_BAD_ARGUMENTS, "BAD_ARGUMENTS", f"Query is not valid UTF-8 at byte {error.start}"
        ) from None


# ---------------------------------------------------------------------------
# Process lifecycle.


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


class Server6(Server):
    address_family = socket.AF_INET6


def parse_listen(value: str):
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(f"--listen must be HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def fail(message: str) -> "NoReturn":  # noqa: F821 - annotation only
    sys.stderr.write(f"chdb-http: {message}\n")
    sys.stderr.flush()
    sys.exit(1)


def prepare_data_dir(path: str) -> str:
    path = os.path.abspath(path)
    if "?" in path:
        fail(f"data directory {path!r} must not contain '?' (chDB reads it as a connection string)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        fail(f"data directory {path!r} is unusable: {error.strerror or error}")
    if not os.path.isdir(path):
        fail(f"data directory {path!r} is not a directory")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        fail(f"data directory {path!r} is not readable and writable by this user")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="ClickHouse HTTP interface backed by chDB")
    parser.add_argument("--listen", default="127.0.0.1:8123", help="HOST:PORT to listen on (port 0 picks a free one)")
    parser.add_argument("--data", required=True, help="chDB data directory (created if missing)")
    parser.add_argument("--user", default="default", help="user name clients must present when a password is set")
    parser.add_argument(
        "--password", default=None, help=f"password clients must present (prefer the {PASSWORD_ENV} environment variable)"
    )
    parser.add_argument(
        "--max-pending-insert-mb",
        type=int,
        default=ingest.DEFAULT_MAX_PENDING_BYTES // (1024 * 1024),
        help="refuse inserts with 503 while more than this many MiB of inserts wait to be committed (0: no group commit)",
    )
    parser.add_argument(
        "--insert-spool",
        default=None,
        help="directory where inserts with async_insert=1 and wait_for_async_insert=0 are kept until committed "
        "(answered once there; committed again after a restart)",
    )
    parser.add_argument(
        "--wait-for-async-insert",
        choices=["0", "1"],
        default="1",
        help="the default of wait_for_async_insert for requests that do not set it (ClickHouse's is 1)",
    )
    args = parser.parse_args(argv)

    password = args.password if args.password is not None else os.environ.get(PASSWORD_ENV)
    if password == "":
        password = None
    try:
        host, port = parse_listen(args.listen)
    except ValueError as error:
        fail(str(error))
    data_dir = prepare_data_dir(args.data)

    # chDB imports pyarrow (and numpy with it) when it can, for its Python
    # Arrow APIs, which this server never calls (the engine writes every
    # output format itself): half of every start's 0.6 s of CPU.
    sys.modules.setdefault("pyarrow", None)
    try:
        from chdb.session import Session
    except Exception as error:  # noqa: BLE001 - ImportError or a broken shared object
        fail(f"cannot import chdb ({type(error).__name__}: {one_line(str(error), 200)}); install chdb-core into this Python")

    def log(message: str) -> None:
        sys.stderr.write("chdb-http: " + redact(message) + "\n")
        sys.stderr.flush()

    try:
        engine = Engine(Session, data_dir, log)
    except QueryError as error:
        fail(f"cannot open chDB session on {data_dir!r}: {one_line(error.message, 300)}")
    except Exception as error:  # noqa: BLE001
        fail(f"cannot open chDB session on {data_dir!r}: {one_line(str(error), 300)}")

    tmp_dir = tempfile.mkdtemp(prefix="chdb-http-")
    Handler.engine = engine
    Handler.wait_for_async_insert = args.wait_for_async_insert
    if args.max_pending_insert_mb > 0:
        Handler.committer = ingest.GroupCommitter(
            tmp_dir,
            log,
            max_pending_bytes=args.max_pending_insert_mb * 1024 * 1024,
            spool_dir=os.path.abspath(args.insert_spool) if args.insert_spool else None,
        )
        Handler.committer.recover(
            lambda record, path, _size: grouped_insert(
                engine, record["database"], record["settings"], record["template"], path
            )
        )
    Handler.config = Config(
        user=args.user,
        password=password,
        tmp_dir=tmp_dir,
        display_name=socket.gethostname() or "chdb-http",
    )
    server_class = Server6 if ":" in host else Server
    try:
        server = server_class((host, port), Handler)
    except OSError as error:
        engine.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        fail(f"cannot listen on {args.listen}: {error.strerror or error}")

    def request_shutdown(signum, _frame):
        log(f"Received {signal.Signals(signum).name}, shutting down")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, request_shutdown)
    signal.signal(signal.SIGINT, request_shutdown)

    bound_port = server.server_address[1]
    shown_host = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"chdb-http listening on http://{shown_host}:{bound_port}\n")
    sys.stdout.flush()
    log(f"Serving chDB data directory {data_dir} (auth {'on' if password else 'off'})")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if Handler.committer is not None:
            Handler.committer.close()  # commits what is queued
        engine.close()  # waits for a running query, then releases the data directory
        shutil.rmtree(tmp_dir, ignore_errors=True)
        log("Stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
