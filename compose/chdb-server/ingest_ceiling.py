#!/usr/bin/env python3
"""The engine's own ingest ceiling: spans straight into chDB, no HTTP, no collector.

    python ingest_ceiling.py [--rows 1000000] [--batches 8192,65536,262144,1000000]

Creates a fresh chDB data directory with the schema of compose/sql (the
exporter's `otel_traces`, its trace-id lookup view, and the CI view),
generates `--rows` spans shaped like the volume tests' (a CI runner's
resource, `ci.*` ids, current timestamps, random ids) as RowBinary with the
exact column list rotel inserts, then inserts them with
`INSERT ... FROM INFILE ... FORMAT RowBinary` in batches of each size, into a
fresh database each time, and prints rows/s per batch size (views included);
then the same batches the way chdb-http's group commit inserts them,
`INSERT ... SELECT * FROM file(..., RowBinary, <types without LowCardinality>)`
(ingest.py), side by side.
That is the most a stack built on this engine can land on this machine; the
stack's landed rate is compared with it (`cargo xtask bench`, compose/README.md).

Prints one line per form and batch size: `ceiling form=<infile|select> batch=<rows> rows=<n> seconds=<s> rows_per_s=<r>
cpu_seconds=<c> cpu_s_per_100k=<c per 100,000 rows>` (the CPU of the whole process, every engine
thread included, while the inserts ran: on a shared machine the rate drops with the load, the CPU
per row much less, and it is what the stack's CPU split is compared with).
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SQL_DIR = os.path.join(os.path.dirname(HERE), "sql")
sys.path.insert(0, HERE)
import chdb_http  # noqa: E402 - the group commit's SELECT form, built as chdb-http builds it
import ingest  # noqa: E402

# What rotel 0.0.1a15 inserts (captured on the wire; see compose/sql/10_otel_traces.sql).
ROTEL_COLUMNS = (
    "Timestamp, TraceId, SpanId, ParentSpanId, TraceState, SpanName, SpanKind, ServiceName, "
    "ResourceAttributes, ScopeName, ScopeVersion, SpanAttributes, Duration, StatusCode, StatusMessage, "
    "`Events.Timestamp`, `Events.Name`, `Events.Attributes`, `Links.TraceId`, `Links.SpanId`, "
    "`Links.TraceState`, `Links.Attributes`"
)

# The volume tests' spans: 1000 spans a trace, one CI runner resource.
GENERATE = f"""
SELECT
    now64(9) - toIntervalMillisecond(250) AS Timestamp,
    lower(hex(reinterpretAsFixedString(cityHash64(intDiv(number, 1000), 1)))) || lower(hex(reinterpretAsFixedString(cityHash64(intDiv(number, 1000), 2)))) AS TraceId,
    lower(hex(reinterpretAsFixedString(cityHash64(number, 3)))) AS SpanId,
    '' AS ParentSpanId,
    '' AS TraceState,
    'step_script' AS SpanName,
    'Internal' AS SpanKind,
    'gitlab-ci-runner' AS ServiceName,
    map('service.name', 'gitlab-ci-runner', 'volume.resource', 'ceiling', 'ci.pipeline.id', '4100',
        'ci.project.id', '42', 'ci.runner.id', '7') AS ResourceAttributes,
    'gitlab-ci-runner' AS ScopeName,
    '' AS ScopeVersion,
    map('ci.job.id', toString(1000 + intDiv(number, 50))) AS SpanAttributes,
    toUInt64(250000000) AS Duration,
    'Unset' AS StatusCode,
    '' AS StatusMessage,
    CAST([], 'Array(DateTime64(9))') AS `Events.Timestamp`,
    CAST([], 'Array(LowCardinality(String))') AS `Events.Name`,
    CAST([], 'Array(Map(LowCardinality(String), String))') AS `Events.Attributes`,
    CAST([], 'Array(String)') AS `Links.TraceId`,
    CAST([], 'Array(String)') AS `Links.SpanId`,
    CAST([], 'Array(String)') AS `Links.TraceState`,
    CAST([], 'Array(Map(LowCardinality(String), String))') AS `Links.Attributes`
FROM numbers({{first}}, {{count}})
"""


def statements(text):
    current = []
    for line in text.splitlines():
        if line.lstrip().startswith("--"):
            continue
        if line.rstrip().endswith(";"):
            current.append(line.rstrip()[:-1])
            statement = "\n".join(current).strip()
            if statement:
                yield statement
            current = []
        else:
            current.append(line)
    if "\n".join(current).strip():
        yield "\n".join(current).strip()


def schema(database):
    for name in sorted(os.listdir(SQL_DIR)):
        if name.endswith(".sql"):
            with open(os.path.join(SQL_DIR, name)) as f:
                for statement in statements(f.read()):
                    yield re.sub(r"\botel\.", f"{database}.", statement).replace(
                        "DATABASE IF NOT EXISTS otel", f"DATABASE IF NOT EXISTS {database}"
                    )


def check(result):
    if result is not None and hasattr(result, "has_error") and result.has_error():
        raise RuntimeError(result.error_message())
    return result


def insert_sql(form, session, database, path, batch):
    """One batch's insert, FROM INFILE or as chdb-http's group commit runs it."""
    if form == "infile":
        return (
            f"INSERT INTO {database}.otel_traces ({ROTEL_COLUMNS}) FROM INFILE '{path}' "
            f"SETTINGS max_insert_block_size = {batch + 1} FORMAT RowBinary"
        )
    columns = check(
        session.query(
            f"SELECT name, type FROM system.columns WHERE database = '{database}' AND table = 'otel_traces'",
            "JSONEachRow",
        )
    )
    types = {row["name"]: row["type"] for row in map(json.loads, columns.bytes().decode().splitlines())}
    settings = ", ".join(f"{name} = {value}" for name, value in ingest.GROUP_SELECT_SETTINGS)
    head = f"INSERT INTO {database}.otel_traces ({ROTEL_COLUMNS}) SETTINGS {settings}"
    return chdb_http.file_select_sql(head, chdb_http.insert_target(head), types, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batches", default="8192,65536,262144,1000000")
    parser.add_argument("--forms", default="infile,select")
    args = parser.parse_args(argv)
    from chdb.session import Session

    work = tempfile.mkdtemp(prefix="ingest-ceiling-")
    try:
        session = Session(os.path.join(work, "data"))
        files = {}
        for batch in [int(b) for b in args.batches.split(",")]:
            batch = min(batch, args.rows)
            # One RowBinary file per batch, made once per batch size.
            paths = []
            for first in range(0, args.rows, batch):
                path = os.path.join(work, f"b{batch}-{first}.rowbinary")
                count = min(batch, args.rows - first)
                data = check(session.query(GENERATE.format(first=first, count=count), "RowBinary")).bytes()
                with open(path, "wb") as f:
                    f.write(data)
                paths.append(path)
            files[batch] = paths
        runs = [(form, batch, paths) for form in args.forms.split(",") for batch, paths in files.items()]
        for form, batch, paths in runs:
            database = f"ceiling_{form}_{batch}"
            for statement in schema(database):
                check(session.query(statement))
            started = time.monotonic()
            cpu_started = time.process_time()  # every thread of this process: the engine's included
            for path in paths:
                check(session.query(insert_sql(form, session, database, path, batch)))
            elapsed = time.monotonic() - started
            cpu = time.process_time() - cpu_started
            stored = int(check(session.query(f"SELECT count() FROM {database}.otel_traces")).bytes())
            ci = int(check(session.query(f"SELECT count() FROM {database}.ci_job_telemetry_traces")).bytes())
            if stored != args.rows or ci != args.rows:
                raise RuntimeError(f"expected {args.rows} rows, stored {stored} (CI view {ci})")
            print(
                f"ceiling form={form} batch={batch} rows={args.rows} seconds={elapsed:.2f} rows_per_s={args.rows / elapsed:.0f} "
                f"cpu_seconds={cpu:.2f} cpu_s_per_100k={cpu * 100_000 / args.rows:.2f}",
                flush=True,
            )
            check(session.query(f"DROP DATABASE {database} SYNC"))
        for paths in files.values():
            for path in paths:
                os.unlink(path)
        session.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
