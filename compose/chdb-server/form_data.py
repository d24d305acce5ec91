"""`multipart/form-data` request bodies, as ClickHouse's HTTP interface reads them.

Clients send query parameters (`param_<name>`), the query itself (`query`)
and settings as form fields when they do not fit a URL: the `clickhouse` Rust
crate does so for every `.param()`, clickhouse-connect for external data.
ClickHouse merges form fields with the URL parameters. Parts with a
`filename` are external data tables.

The body is parsed from a file in pieces; each part's content goes to a
spooled temporary file, so a large part never sits in memory whole.

This module imports nothing else of chdb-http.
"""

import re
import tempfile
from dataclasses import dataclass
from typing import List, Optional

PIECE_BYTES = 1024 * 1024
MAX_PART_HEADER_BYTES = 16 * 1024
MAX_PARTS = 1000
SPOOL_BYTES = 1024 * 1024


class FormError(Exception):
    pass


@dataclass
class Part:
    name: str
    filename: Optional[str]
    content_type: str
    file: object  # a spooled temporary file, positioned at 0

    def text(self, limit: int) -> str:
        """The content as UTF-8 text; FormError when longer than `limit` bytes."""
        self.file.seek(0)
        data = self.file.read(limit + 1)
        if len(data) > limit:
            raise FormError(f"form field `{self.name}` is longer than {limit} bytes")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise FormError(f"form field `{self.name}` is not valid UTF-8 at byte {error.start}") from None

    def close(self) -> None:
        self.file.close()


def boundary_of(content_type: str) -> Optional[str]:
    """The boundary of a `multipart/form-data` Content-Type, None for any other type."""
    kind, _, params = (content_type or "").partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    match = re.search(r'(?i)(?:^|;)\s*boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', params)
    if match is None:
        raise FormError("multipart/form-data without a boundary")
    boundary = match.group(1) or match.group(2)
    if not 1 <= len(boundary) <= 200:
        raise FormError("multipart/form-data boundary must be 1 to 200 characters")
    return boundary


def _disposition(headers: dict):
    value = headers.get("content-disposition", "")
    if not value.lower().startswith("form-data"):
        raise FormError("a form part has no `Content-Disposition: form-data` header")
    params = {}
    for match in re.finditer(r';\s*([A-Za-z*]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))', value):
        raw = match.group(2) if match.group(2) is not None else (match.group(3) or "").strip()
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", raw)
    if "name" not in params:
        raise FormError("a form part has no name")
    return params["name"], params.get("filename")


def parse(source, boundary: str, tmp_dir: str) -> List[Part]:
    """Parses the multipart body in the file `source`. The caller closes the parts."""
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    parts: List[Part] = []
    # A leading CRLF lets the first delimiter match like every other one.
    buffer = b"\r\n"
    current: Optional[Part] = None
    eof = False
    try:
        while True:
            if current is None:
                # Find a delimiter, then the part's headers.
                at = buffer.find(delimiter)
                while at < 0 and not eof:
                    piece = source.read(PIECE_BYTES)
                    if not piece:
                        eof = True
                        break
                    buffer = buffer[-(len(delimiter) + MAX_PART_HEADER_BYTES) :] + piece
                    at = buffer.find(delimiter)
                if at < 0:
                    raise FormError("multipart body does not contain its boundary")
                buffer = buffer[at + len(delimiter) :]
                while len(buffer) < 2 and not eof:
                    piece = source.read(PIECE_BYTES)
                    eof = not piece
                    buffer += piece
                if buffer.startswith(b"--"):
                    return parts  # the closing delimiter
                end = buffer.find(b"\r\n\r\n")
                while end < 0 and not eof and len(buffer) <= MAX_PART_HEADER_BYTES:
                    piece = source.read(PIECE_BYTES)
                    eof = not piece
                    buffer += piece
                    end = buffer.find(b"\r\n\r\n")
                if end < 0 or end > MAX_PART_HEADER_BYTES:
                    raise FormError("a form part's headers are missing or too long")
                headers = {}
                for line in buffer[:end].decode("latin-1").split("\r\n"):
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                buffer = buffer[end + 4 :]
                name, filename = _disposition(headers)
                if len(parts) >= MAX_PARTS:
                    raise FormError(f"more than {MAX_PARTS} form parts")
                current = Part(
                    name,
                    filename,
                    headers.get("content-type", ""),
                    tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, dir=tmp_dir),
                )
                parts.append(current)
                continue
            # Copy content up to the next delimiter into the current part.
            at = buffer.find(delimiter)
            if at >= 0:
                current.file.write(buffer[:at])
                current.file.seek(0)
                buffer = buffer[at:]
                current = None
                continue
            keep = len(delimiter) - 1
            if len(buffer) > keep:
                current.file.write(buffer[:-keep])
                buffer = buffer[-keep:]
            piece = source.read(PIECE_BYTES)
            if not piece:
                raise FormError("multipart body ends inside a part (no closing boundary)")
            buffer += piece
    except BaseException:
        for part in parts:
            part.close()
        raise
