"""chdb-http against clickhouse-connect, ClickHouse's Python client, at its
default settings (compression on: lz4 request bodies, compressed answers).
The `clickhouse` Rust crate has its own tests in
conformance/tests/it/clickhouse_clients.rs.

    .venv/bin/python -m unittest discover -s compose/chdb-server -v
"""

import datetime
import unittest

import clickhouse_connect
import clickhouse_connect.driver.external

from test_chdb_http import PASSWORD, ServerTestCase


class ClickHouseConnectTest(ServerTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.client = clickhouse_connect.get_client(
            host="127.0.0.1", port=cls.server.port, username="default", password=PASSWORD
        )
        cls.addClassCleanup(cls.client.close)

    def test_a_typed_query(self):
        result = self.client.query(
            "SELECT toUInt64(18446744073709551615) AS big, 'text' AS s, "
            "toDateTime64('2026-01-02 03:04:05.123456', 6, 'UTC') AS t, [1, 2, 3] AS a, "
            "map('k', 'v') AS m, CAST(NULL, 'Nullable(Int8)') AS n"
        )
        self.assertEqual(result.column_names, ("big", "s", "t", "a", "m", "n"))
        big, s, t, a, m, n = result.result_rows[0]
        self.assertEqual((big, s, a, m, n), (18446744073709551615, "text", [1, 2, 3], {"k": "v"}, None))
        self.assertEqual(t.replace(tzinfo=None), datetime.datetime(2026, 1, 2, 3, 4, 5, 123456))

    def test_server_side_parameters(self):
        result = self.client.query("SELECT {x:UInt32} + 1 AS y, {s:String} AS s", parameters={"x": 41, "s": "it's"})
        self.assertEqual(result.result_rows, [(42, "it's")])

    def test_insert_with_and_without_the_table_schema(self):
        self.client.command("CREATE TABLE connect_rows (id UInt64, name String, at DateTime) ENGINE = MergeTree ORDER BY id")
        at = datetime.datetime(2026, 5, 6, 7, 8, 9)
        # With column names only, the client reads the table's schema first.
        self.client.insert("connect_rows", [[1, "one", at], [2, "two", at]], column_names=["id", "name", "at"])
        # With the types given, it sends without asking the server.
        self.client.insert(
            "connect_rows", [[3, "three", at]], column_names=["id", "name", "at"], column_type_names=["UInt64", "String", "DateTime"]
        )
        rows = self.client.query("SELECT id, name, at FROM connect_rows ORDER BY id").result_rows
        self.assertEqual([(i, n) for i, n, _ in rows], [(1, "one"), (2, "two"), (3, "three")])
        self.assertEqual({t.replace(tzinfo=None) for _, _, t in rows}, {at})

    def test_a_million_row_insert(self):
        self.client.command("CREATE TABLE connect_large (id UInt64, label String) ENGINE = MergeTree ORDER BY id")
        total = 1_000_000
        columns = [list(range(total)), [f"row-{i % 1000}" for i in range(total)]]
        summary = self.client.insert("connect_large", columns, column_names=["id", "label"], column_oriented=True)
        self.assertEqual(summary.written_rows, total)
        result = self.client.query("SELECT count(), sum(id), uniqExact(label) FROM connect_large").result_rows
        self.assertEqual(result, [(total, total * (total - 1) // 2, 1000)])

    def test_external_data(self):
        data = clickhouse_connect.driver.external.ExternalData(
            file_name="ext_rows.csv", data=b"1,one\n2,two\n", fmt="CSV", structure=["id UInt32", "name String"]
        )
        result = self.client.query("SELECT sum(id), groupArray(name) FROM ext_rows", external_data=data)
        self.assertEqual(result.result_rows, [(3, ["one", "two"])])

    def test_errors_keep_their_code(self):
        with self.assertRaises(clickhouse_connect.driver.exceptions.DatabaseError) as caught:
            self.client.query("SELECT * FROM no_such_table_here")
        self.assertIn("UNKNOWN_TABLE", str(caught.exception))
        self.assertEqual(self.client.command("SELECT 5"), 5)


if __name__ == "__main__":
    unittest.main()
