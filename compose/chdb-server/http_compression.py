"""Compressed transfer as ClickHouse's HTTP interface speaks it.

Two layers, both streamed file to file so a request never sits in memory:

- HTTP `Content-Encoding` of a request body and, when the client sends
  `enable_http_compression=1` and an `Accept-Encoding` we know, of the
  response: gzip, deflate (zlib), br, zstd, lz4 (the LZ4 frame format), xz.
- ClickHouse's own compressed blocks (`decompress=1` request bodies,
  `compress=1` responses), which the `clickhouse` Rust crate uses by default.
  A block is: 16 bytes of CityHash128 (version 1.0.2) of
  the rest of the block; one method byte (0x82 LZ4, 0x90 ZSTD, 0x02 none); the
  compressed size including the 9-byte header and the decompressed size, both
  little-endian uint32; the payload. Checksums are verified, as ClickHouse
  does unless `http_native_compression_disable_checksumming_on_decompress=1`.

ClickHouse applies the `Content-Encoding` outside the blocks: a request body
is first content-decoded, then split into blocks.

This module imports nothing else of chdb-http: failures are `TransferError`s
carrying ClickHouse's code and name, which the server turns into answers.
"""

import gzip
import lzma
import struct
import zlib

import lz4.block
import lz4.frame
import zstandard
from clickhouse_cityhash.cityhash import CityHash128

try:
    import brotli
except ImportError:  # pragma: no cover - pinned in requirements.txt
    brotli = None

DECODE_PIECE_BYTES = 64 * 1024
# ClickHouse refuses blocks larger than 1 GiB (TOO_LARGE_SIZE_COMPRESSED); we
# hold one block in memory at a time, so the bound is tighter.
MAX_BLOCK_BYTES = 64 * 1024 * 1024
# Responses are cut into blocks of this many bytes, like ClickHouse's
# max_compress_block_size default.
RESPONSE_BLOCK_BYTES = 1024 * 1024

METHOD_NONE = 0x02
METHOD_LZ4 = 0x82
METHOD_ZSTD = 0x90
HEADER_BYTES = 9
CHECKSUM_BYTES = 16

# ClickHouse error codes (ErrorCodes.cpp).
CODE_UNKNOWN_COMPRESSION_METHOD = 89
CODE_CHECKSUM_DOESNT_MATCH = 40
CODE_TOO_LARGE_SIZE_COMPRESSED = 39
CODE_CANNOT_DECOMPRESS = 271
CODE_CANNOT_READ_ALL_DATA = 33
CODE_QUERY_IS_TOO_LARGE = 229


class TransferError(Exception):
    def __init__(self, code: int, name: str, text: str):
        super().__init__(text)
        self.code = code
        self.name = name
        self.text = text


# ---------------------------------------------------------------------------
# ClickHouse compressed blocks.


def checksum(data: bytes) -> bytes:
    # clickhouse-cityhash returns the 128-bit value with CityHash's `first`
    # word in the high bits; ClickHouse writes `first` then `second`, each
    # little-endian (checked against a block made by the `clickhouse` crate).
    value = CityHash128(data)
    return struct.pack("<QQ", value >> 64, value & 0xFFFFFFFFFFFFFFFF)


def compress_block(data: bytes, method: int = METHOD_LZ4) -> bytes:
    if method == METHOD_LZ4:
        payload = lz4.block.compress(data, store_size=False)
    elif method == METHOD_ZSTD:
        payload = zstandard.ZstdCompressor(level=1).compress(data)
    elif method == METHOD_NONE:
        payload = data
    else:
        raise ValueError(f"unknown method {method:#x}")
    header = struct.pack("<BII", method, HEADER_BYTES + len(payload), len(data))
    return checksum(header + payload) + header + payload


def compress_blocks(data: bytes, method: int = METHOD_LZ4) -> bytes:
    """`data` as a sequence of blocks (an empty body stays empty)."""
    return b"".join(
        compress_block(data[at : at + RESPONSE_BLOCK_BYTES], method) for at in range(0, len(data), RESPONSE_BLOCK_BYTES)
    )


def _read_full(source, size: int) -> bytes:
    pieces = []
    remaining = size
    while remaining > 0:
        piece = source.read(remaining)
        if not piece:
            break
        pieces.append(piece)
        remaining -= len(piece)
    return b"".join(pieces)


def decompress_blocks(source, sink, verify: bool = True, limit: int = 0) -> int:
    """Reads blocks from the file `source` until its end, writes the data to
    `sink(bytes)`; returns the decompressed size. `limit` > 0 bounds it."""
    total = 0
    while True:
        head = _read_full(source, CHECKSUM_BYTES + HEADER_BYTES)
        if not head:
            return total
        if len(head) < CHECKSUM_BYTES + HEADER_BYTES:
            raise TransferError(
                CODE_CANNOT_READ_ALL_DATA, "CANNOT_READ_ALL_DATA", "Cannot read all data: truncated compressed block header"
            )
        expected = head[:CHECKSUM_BYTES]
        method, compressed_size, size = struct.unpack("<BII", head[CHECKSUM_BYTES:])
        if method not in (METHOD_LZ4, METHOD_ZSTD, METHOD_NONE):
            raise TransferError(
                CODE_UNKNOWN_COMPRESSION_METHOD,
                "UNKNOWN_COMPRESSION_METHOD",
                f"Unknown compression method {method:#04x} in a compressed block",
            )
        if compressed_size < HEADER_BYTES or compressed_size > MAX_BLOCK_BYTES or size > MAX_BLOCK_BYTES:
            raise TransferError(
                CODE_TOO_LARGE_SIZE_COMPRESSED,
                "TOO_LARGE_SIZE_COMPRESSED",
                f"Too large size_compressed: {compressed_size} (or size_decompressed {size}); the limit is {MAX_BLOCK_BYTES}",
            )
        payload = _read_full(source, compressed_size - HEADER_BYTES)
        if len(payload) < compressed_size - HEADER_BYTES:
            raise TransferError(
                CODE_CANNOT_READ_ALL_DATA, "CANNOT_READ_ALL_DATA", "Cannot read all data: truncated compressed block"
            )
        if verify:
            actual = checksum(head[CHECKSUM_BYTES:] + payload)
            if actual != expected:
                raise TransferError(
                    CODE_CHECKSUM_DOESNT_MATCH,
                    "CHECKSUM_DOESNT_MATCH",
                    f"Checksum doesn't match: corrupted data. Reference: {expected.hex()}. Actual: {actual.hex()}. "
                    f"Size of compressed block: {compressed_size}",
                )
        try:
            if method == METHOD_LZ4:
                data = lz4.block.decompress(payload, uncompressed_size=size)
            elif method == METHOD_ZSTD:
                data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=size)
            else:
                data = payload
        except Exception as error:  # noqa: BLE001 - lz4 and zstandard raise their own types
            raise TransferError(CODE_CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS", f"Cannot decompress a block: {error}") from None
        if len(data) != size:
            raise TransferError(
                CODE_CANNOT_DECOMPRESS,
                "CANNOT_DECOMPRESS",
                f"Cannot decompress a block: got {len(data)} bytes, the header says {size}",
            )
        total += size
        if limit and total > limit:
            raise TransferError(
                CODE_QUERY_IS_TOO_LARGE, "QUERY_IS_TOO_LARGE", f"Decompressed request body is larger than {limit} bytes"
            )
        sink(data)


# ---------------------------------------------------------------------------
# HTTP Content-Encoding.

# The names ClickHouse accepts (chooseHTTPCompressionMethod), in the order it
# prefers them when a client accepts several.
RESPONSE_ENCODINGS = ("gzip", "deflate", "xz", "zstd", "lz4", "br")
_ALIASES = {"x-gzip": "gzip", "zst": "zstd", "lzma": "xz"}


def known_encoding(name: str):
    name = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if name in ("", "identity", "none"):
        return "identity"
    if name == "br" and brotli is None:
        return None
    return name if name in RESPONSE_ENCODINGS else None


def _decoder(encoding: str):
    """An object with `decompress(bytes) -> bytes` and `flush() -> bytes`.

    Clients send several frames (or gzip members) one after the other, one
    per block of rows, and so does ClickHouse: each decoder starts a new
    frame where the previous one ended."""
    if encoding == "gzip":
        return _Frames(lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))
    if encoding == "deflate":
        return _Frames(zlib.decompressobj)
    if encoding == "xz":
        return _Frames(lzma.LZMADecompressor)
    if encoding == "zstd":
        return _Frames(lambda: zstandard.ZstdDecompressor().decompressobj())
    if encoding == "lz4":
        return _Frames(lz4.frame.LZ4FrameDecompressor)
    if encoding == "br":
        return _Brotli(brotli.Decompressor())
    raise ValueError(encoding)


class _Frames:
    def __init__(self, make):
        self._make = make
        self._inner = make()

    def decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._inner.decompress(data))
            if not getattr(self._inner, "eof", False):
                break
            data = self._inner.unused_data
            self._inner = self._make()
        return b"".join(out)

    def flush(self) -> bytes:
        flush = getattr(self._inner, "flush", None)
        return flush() if flush is not None and not isinstance(self._inner, lzma.LZMADecompressor) else b""


class _Brotli:
    def __init__(self, inner):
        self._inner = inner

    def decompress(self, data: bytes) -> bytes:
        return self._inner.process(data)

    def flush(self) -> bytes:
        return b""


def decode_content(encoding: str, source, sink, limit: int = 0) -> int:
    """Content-decodes the file `source` into `sink(bytes)`; returns the size."""
    decoder = _decoder(encoding)
    total = 0
    try:
        while True:
            # Small pieces bound what one call can expand to in memory.
            piece = source.read(DECODE_PIECE_BYTES)
            if not piece:
                break
            data = decoder.decompress(piece)
            total += len(data)
            if limit and total > limit:
                raise TransferError(
                    CODE_QUERY_IS_TOO_LARGE, "QUERY_IS_TOO_LARGE", f"Decoded request body is larger than {limit} bytes"
                )
            if data:
                sink(data)
        tail = decoder.flush()
    except TransferError:
        raise
    except Exception as error:  # noqa: BLE001 - each codec raises its own types
        raise TransferError(
            CODE_CANNOT_DECOMPRESS, "CANNOT_DECOMPRESS", f"Cannot decode the request body as {encoding}: {error}"
        ) from None
    if tail:
        total += len(tail)
        sink(tail)
    return total


def encode_content(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data, compresslevel=3)
    if encoding == "deflate":
        return zlib.compress(data, 3)
    if encoding == "xz":
        return lzma.compress(data, preset=1)
    if encoding == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if encoding == "lz4":
        return lz4.frame.compress(data)
    if encoding == "br":
        return brotli.compress(data, quality=3)
    raise ValueError(encoding)


def choose_response_encoding(accept_encoding: str):
    """The encoding ClickHouse would pick for `Accept-Encoding`, or None."""
    offered = set()
    for item in (accept_encoding or "").split(","):
        name, _, params = item.partition(";")
        if params.strip().replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            continue
        known = known_encoding(name)
        if known and known != "identity":
            offered.add(known)
    for name in RESPONSE_ENCODINGS:
        if name in offered:
            return name
    return None
