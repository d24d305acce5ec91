"""Tests of what real ClickHouse clients send at their defaults: compressed
transfer, form bodies, query parameters, status codes, and the memory a
request may take. Run like test_chdb_http.py:

    .venv/bin/python -m unittest discover -s compose/chdb-server -v

`ClickHouseConnectTest` uses clickhouse-connect (compose/requirements-test.txt)
with its default settings (compression on).
"""

import gzip
import http.client
import io
import lzma
import os
import socket
import struct
import unittest
import urllib.parse
import zlib

import brotli
import lz4.frame
import zstandard

import chdb_http
import form_data
import http_compression
from test_chdb_http import PASSWORD, ServerTestCase

# A block made by the `clickhouse` Rust crate 0.15.3 (its CityHash128 is
# cityhash-rs, ClickHouse's v1.0.2): `_priv::lz4_compress(b"hello, chdb-http")`.
CRATE_BLOCK_HEX = (
    "ad4810e15d9a6ada0253d84698d6faeb"  # CityHash128
    "821b00000010000000"  # LZ4, 27 bytes compressed (with this header), 16 bytes of data
    "f00168656c6c6f2c20636864622d68747470"
)


class CompressedBlocksTest(unittest.TestCase):
    def decompress(self, data, verify=True):
        out = []
        http_compression.decompress_blocks(io.BytesIO(data), out.append, verify)
        return b"".join(out)

    def test_blocks_round_trip_for_every_method(self):
        data = os.urandom(1000) + b"abc" * 100_000
        for method in (http_compression.METHOD_LZ4, http_compression.METHOD_ZSTD, http_compression.METHOD_NONE):
            block = http_compression.compress_block(data, method)
            self.assertEqual(block[16], method)
            self.assertEqual(self.decompress(block + block), data + data)
        self.assertEqual(http_compression.compress_blocks(b""), b"")
        big = os.urandom(3 * http_compression.RESPONSE_BLOCK_BYTES + 5)
        self.assertEqual(self.decompress(http_compression.compress_blocks(big)), big)

    def test_the_checksum_is_clickhouses_cityhash128(self):
        block = bytes.fromhex(CRATE_BLOCK_HEX)
        self.assertEqual(self.decompress(block), b"hello, chdb-http")
        self.assertEqual(http_compression.checksum(block[16:]), block[:16])

    def test_broken_blocks_are_refused_with_clickhouses_codes(self):
        original = b"some data " * 100
        block = bytearray(http_compression.compress_block(original))
        flipped = bytearray(block)
        flipped[-1] ^= 0xFF
        cases = (
            (bytes(flipped), http_compression.CODE_CHECKSUM_DOESNT_MATCH),
            (bytes(block[:-3]), http_compression.CODE_CANNOT_READ_ALL_DATA),
            (bytes(block[:20]), http_compression.CODE_CANNOT_READ_ALL_DATA),
            (bytes(block[:16]) + b"\x77" + bytes(block[17:]), http_compression.CODE_UNKNOWN_COMPRESSION_METHOD),
            (bytes(block[:17]) + struct.pack("<I", 1 << 31) + bytes(block[21:]), http_compression.CODE_TOO_LARGE_SIZE_COMPRESSED),
        )
        for data, code in cases:
            with self.assertRaises(http_compression.TransferError) as caught:
                self.decompress(data)
            self.assertEqual(caught.exception.code, code, caught.exception.text)
        # Without verification (http_native_compression_disable_checksumming_on_decompress)
        # the corruption goes through: the checksum is what catches it.
        self.assertNotEqual(self.decompress(bytes(flipped), verify=False), original)

    def test_response_encoding_is_chosen_like_clickhouse(self):
        check = http_compression.choose_response_encoding
        self.assertEqual(check("lz4, zstd, br, gzip, deflate"), "gzip")
        self.assertEqual(check("lz4"), "lz4")
        self.assertEqual(check("zstd;q=1.0, identity"), "zstd")
        self.assertEqual(check("gzip;q=0, br"), "br")
        self.assertIsNone(check("identity"))
        self.assertIsNone(check("snappy-unknown"))


class FormDataTest(unittest.TestCase):
    def body(self, boundary, fields):
        out = b""
        for name, value in fields:
            out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
        return out + f"--{boundary}--\r\n".encode()

    def test_fields_are_parsed_across_read_pieces(self):
        boundary = "----chdb-http-test-boundary"
        large = b"x" * (form_data.PIECE_BYTES + 17) + b"\r\n--not-the-boundary\r\n"
        fields = [("query", b"SELECT {a:String}"), ("param_a", b"line1\r\nline2"), ("param_big", large), ("empty", b"")]
        parts = form_data.parse(io.BytesIO(self.body(boundary, fields)), boundary, None)
        try:
            self.assertEqual([p.name for p in parts], ["query", "param_a", "param_big", "empty"])
            self.assertEqual(parts[1].text(100), "line1\r\nline2")
            self.assertEqual(parts[2].text(len(large)).encode(), large)
            self.assertEqual(parts[3].text(10), "")
            with self.assertRaises(form_data.FormError):
                parts[2].text(1000)
        finally:
            for part in parts:
                part.close()

    def test_bad_bodies_are_form_errors(self):
        self.assertIsNone(form_data.boundary_of("text/plain"))
        self.assertEqual(form_data.boundary_of('multipart/form-data; boundary="a b"'), "a b")
        with self.assertRaises(form_data.FormError):
            form_data.boundary_of("multipart/form-data")
        for body in (b"no boundary here", b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue without end"):
            with self.assertRaises(form_data.FormError):
                form_data.parse(io.BytesIO(body), "b", None)


class StatusCodeTest(unittest.TestCase):
    def test_codes_map_to_statuses_as_in_clickhouse(self):
        cases = {
            62: 400,  # SYNTAX_ERROR
            36: 400,  # BAD_ARGUMENTS
            6: 400,  # CANNOT_PARSE_TEXT
            167: 400,  # TOO_DEEP_AST
            47: 404,  # UNKNOWN_IDENTIFIER
            60: 404,  # UNKNOWN_TABLE
            73: 404,  # UNKNOWN_FORMAT
            194: 401,  # REQUIRED_PASSWORD
            516: 403,  # AUTHENTICATION_FAILED
            497: 403,  # ACCESS_DENIED
            229: 413,  # QUERY_IS_TOO_LARGE
            381: 411,  # HTTP_LENGTH_REQUIRED
            159: 408,  # TIMEOUT_EXCEEDED
            48: 501,  # NOT_IMPLEMENTED
            209: 503,  # SOCKET_TIMEOUT
            # Not in ClickHouse's table, so 500 there too: READONLY, TOO_DEEP_RECURSION,
            # TOO_LARGE_STRING_SIZE, BAD_QUERY_PARAMETER, CANNOT_READ_ALL_DATA.
            164: 500,
            306: 500,
            131: 500,
            457: 500,
            33: 500,
            1002: 500,
        }
        self.assertEqual({code: chdb_http.http_status_for_code(code) for code in cases}, cases)


def rss_high_water_mark_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


class TransferTest(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.server.query("CREATE TABLE IF NOT EXISTS t (id UInt64, s String) ENGINE = MergeTree ORDER BY id")

    def count(self, where):
        return int(self.server.query(f"SELECT count() FROM t WHERE {where}"))

    def test_decompress_1_bodies_in_lz4_and_zstd_blocks_are_inserted(self):
        for method, first in ((http_compression.METHOD_LZ4, 1000), (http_compression.METHOD_ZSTD, 2000)):
            rows = "".join(f'{{"id": {first + i}, "s": "row {i}"}}\n' for i in range(500)).encode()
            body = http_compression.compress_block(rows[:7000], method) + http_compression.compress_block(rows[7000:], method)
            query = urllib.parse.urlencode({"query": "INSERT INTO t FORMAT JSONEachRow", "decompress": "1"})
            status, _, answer = self.server.request("POST", query, body=body)
            self.assertEqual(status, 200, answer)
            self.assertEqual(self.count(f"id >= {first} AND id < {first + 500}"), 500)

    def test_a_corrupted_block_is_refused_and_the_connection_lives_on(self):
        block = bytearray(http_compression.compress_block(b'{"id": 1, "s": "x"}\n' * 1000))
        block[40] ^= 0x01
        query = urllib.parse.urlencode({"query": "INSERT INTO t FORMAT JSONEachRow", "decompress": "1"})
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            status, headers, body = self.server.request_on(connection, "POST", query, body=bytes(block))
            self.assertEqual(headers["x-clickhouse-exception-code"], "40", body)
            self.assertIn(b"CHECKSUM_DOESNT_MATCH", body)
            self.assertNotEqual(status, 200)
            self.assertEqual(self.server.request_on(connection, "POST", body="SELECT 7")[2], b"7\n")
        finally:
            connection.close()

    def test_compress_1_answers_in_blocks(self):
        status, _, body = self.server.request("POST", "compress=1", body="SELECT number FROM numbers(3)")
        self.assertEqual(status, 200)
        out = []
        http_compression.decompress_blocks(io.BytesIO(body), out.append)
        self.assertEqual(b"".join(out), b"0\n1\n2\n")

    def test_request_content_encodings_are_decoded(self):
        encoders = {
            "gzip": gzip.compress,
            "deflate": zlib.compress,
            "xz": lzma.compress,
            "zstd": zstandard.ZstdCompressor().compress,
            "lz4": lz4.frame.compress,
            "br": brotli.compress,
        }
        for offset, (name, encode) in enumerate(encoders.items()):
            first = 10_000 + offset * 100
            rows = "".join(f"{first + i}\tenc {name}\n" for i in range(100)).encode()
            query = urllib.parse.urlencode({"query": "INSERT INTO t FORMAT TabSeparated"})
            # Clients send one frame per block of rows: two frames here (brotli has no frames).
            body = encode(rows) if name == "br" else encode(rows[:1000]) + encode(rows[1000:])
            status, _, body = self.server.request("POST", query, body=body, headers={"Content-Encoding": name})
            self.assertEqual(status, 200, (name, body))
            self.assertEqual(self.count(f"s = 'enc {name}'"), 100, name)
        status, headers, _ = self.server.request("POST", body="SELECT 1", headers={"Content-Encoding": "snappy-x"})
        self.assertEqual((status, headers["x-clickhouse-exception-code"]), (500, "89"))

    def test_responses_are_encoded_only_when_enable_http_compression_is_set(self):
        decoders = {
            "gzip": gzip.decompress,
            "deflate": zlib.decompress,
            "zstd": lambda b: zstandard.ZstdDecompressor().decompress(b, max_output_size=1 << 20),
            "lz4": lz4.frame.decompress,
            "br": brotli.decompress,
            "xz": lzma.decompress,
        }
        for name, decode in decoders.items():
            status, headers, body = self.server.request(
                "POST", "enable_http_compression=1", body="SELECT 'encoded'", headers={"Accept-Encoding": name}
            )
            self.assertEqual((status, headers.get("content-encoding")), (200, name))
            self.assertEqual(decode(body), b"encoded\n")
        status, headers, body = self.server.request("POST", body="SELECT 'plain'", headers={"Accept-Encoding": "gzip"})
        self.assertEqual((status, headers.get("content-encoding"), body), (200, None, b"plain\n"))

    def test_query_parameters_in_the_url_and_in_a_form_body(self):
        self.assertEqual(self.server.query("SELECT {x:UInt32} * 2", param_x="21"), "42\n")
        boundary = "chdb-http-form"
        fields = [("query", "SELECT {a:String} || {b:String}"), ("param_a", "multi\\nline "), ("param_b", "'quoted'")]
        body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n' for n, v in fields)
        body += f"--{boundary}--\r\n"
        content_type = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status, _, answer = self.server.request("POST", "default_format=RawBLOB", body=body, headers=content_type)
        self.assertEqual((status, answer), (200, b"multi\nline 'quoted'"))
        # Values are in escaped form, as in ClickHouse: a raw line break is refused.
        status, headers, _ = self.server.request("POST", "param_x=a%0D%0Ab", body="SELECT {x:String}")
        self.assertEqual(headers["x-clickhouse-exception-code"], "457")

    def test_external_data_is_a_table_for_one_query(self):
        boundary = "chdb-http-ext"
        content_type = {"Content-Type": f"multipart/form-data; boundary={boundary}"}

        def file_part(name, data):
            return (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.tsv"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n{data}\r\n"
            )

        body = file_part("ext", "1\ta\n2\tb\n") + file_part("pairs", "5,6\n") + f"--{boundary}--\r\n"
        query = urllib.parse.urlencode(
            {
                "query": "SELECT sum(id), groupArray(s), (SELECT _1 * _2 FROM pairs) FROM ext",
                "ext_structure": "id UInt32, s String",
                "pairs_types": "UInt8,UInt8",
                "pairs_format": "CSV",
                "database": "system",
            }
        )
        status, _, answer = self.server.request("POST", query, body=body, headers=content_type)
        self.assertEqual((status, answer), (200, b"3\t['a','b']\t30\n"))
        # The tables were for that query only.
        status, headers, _ = self.server.request("POST", body="SELECT * FROM ext")
        self.assertEqual(headers["x-clickhouse-exception-code"], "60")
        status, headers, answer = self.server.request("POST", "query=SELECT+1", body=file_part("ext", "1") + f"--{boundary}--\r\n", headers=content_type)
        self.assertEqual((status, headers["x-clickhouse-exception-code"]), (400, "36"))
        self.assertIn(b"ext_structure", answer)

    def test_an_error_is_answered_after_the_body_was_read(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            body = b"x" * (8 * 1024 * 1024)
            connection.request("POST", "/?query=INSERT+INTO+t+FORMAT+TabSeparated", body=body, headers={"X-ClickHouse-Key": "wrong"})
            response = connection.getresponse()
            self.assertEqual((response.status, response.getheader("X-ClickHouse-Exception-Code")), (403, "516"))
            response.read()
            self.assertEqual(self.server.request_on(connection, "POST", body="SELECT 8")[2], b"8\n")
        finally:
            connection.close()

    def raw_response(self, raw):
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=30) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            response = b""
            while True:
                piece = sock.recv(65536)
                if not piece:
                    return response
                response += piece

    def test_framing_headers_are_checked(self):
        auth = f"X-ClickHouse-Key: {PASSWORD}\r\n".encode()
        cases = (
            (b"Content-Length: 12abc\r\n", b"HTTP/1.1 400", b"Invalid Content-Length"),
            (b"Content-Length: -1\r\n", b"HTTP/1.1 400", b"Invalid Content-Length"),
            (b"Content-Length: 3\r\nContent-Length: 4\r\n", b"HTTP/1.1 400", b"Conflicting Content-Length"),
            (b"", b"HTTP/1.1 411", b"HTTP_LENGTH_REQUIRED"),
        )
        for headers, status, text in cases:
            response = self.raw_response(b"POST /?query=SELECT+1 HTTP/1.1\r\nHost: x\r\n" + auth + headers + b"\r\n")
            self.assertTrue(response.startswith(status), (headers, response[:300]))
            self.assertIn(text, response)

    def test_a_32_mib_query_is_refused_without_taking_its_size_in_memory(self):
        pid = self.server.proc.pid
        self.server.query("SELECT 1")
        before = rss_high_water_mark_kib(pid)
        big = b"SELECT '" + b"a" * (32 * 1024 * 1024) + b"'"
        status, headers, body = self.server.request("POST", body=big)
        self.assertEqual((status, headers["x-clickhouse-exception-code"]), (400, "62"), body[:300])
        self.assertIn(b"Max query size exceeded", body)
        grown_mib = (rss_high_water_mark_kib(pid) - before) / 1024
        print(f"\n  peak RSS growth for a 32 MiB query: {grown_mib:.0f} MiB")
        self.assertLess(grown_mib, 24, "peak RSS grew by this many MiB for one 32 MiB query")
        # The same size as INSERT data is fine: it goes to a file, not to memory.
        rows = b"".join(b"%d\tbig insert\n" % (100_000 + i) for i in range(2_000_000))
        query = urllib.parse.urlencode({"query": "INSERT INTO t FORMAT TabSeparated"})
        before = rss_high_water_mark_kib(pid)
        status, _, body = self.server.request("POST", query, body=rows)
        self.assertEqual(status, 200, body)
        self.assertEqual(self.count("s = 'big insert'"), 2_000_000)
        print(f"\n  peak RSS growth for a {len(rows) >> 20} MiB insert: {(rss_high_water_mark_kib(pid) - before) / 1024:.0f} MiB")

    def test_engine_errors_answer_with_their_own_code(self):
        deep = "SELECT " + "(" * 2000 + "1" + ")" * 2000
        cases = (
            ("GET", urllib.parse.urlencode({"query": "CREATE TABLE via_get (a UInt8) ENGINE = Memory"}), None, "164"),
            ("POST", "", deep, "306"),
            ("POST", "", "SELECT repeat('a', 2000000000)", "131"),
            ("POST", "param_x=abc", "SELECT {x:UInt8}", "457"),
            ("POST", "", "SELECT * FROM no_such_table", "60"),
        )
        for method, query, body, code in cases:
            status, headers, answer = self.server.request(method, query, body=body)
            self.assertEqual(headers["x-clickhouse-exception-code"], code, answer[:200])
            self.assertEqual(status, chdb_http.http_status_for_code(int(code)))
            self.assertTrue(answer.startswith(f"Code: {code}. DB::Exception:".encode()), answer[:200])

    def test_max_query_size_is_honoured(self):
        status, headers, _ = self.server.request("POST", "max_query_size=10", body="SELECT 1 + 1 + 1")
        self.assertEqual((status, headers["x-clickhouse-exception-code"]), (400, "62"))
        self.assertEqual(self.server.query("SELECT 1 + 1 + 1", max_query_size="100"), "3\n")
