"""Defects of the pinned engine (chDB 26.9.0, ClickHouse 26.9.2.1) that the
project works around. Each test pins the defect as it is today: when a newer
engine fixes it, the test fails, and the workaround it names can go.

Run with the project's venv:
    .venv/bin/python -m unittest discover -s compose/chdb-server -v
"""

import shutil
import tempfile
import unittest

from chdb.session import Session

# 2026-12-02 07:14:10.300 UTC, and the whole seconds around it.
ROW = "2026-12-02 07:14:10.3"
SECOND_BEFORE = 1796195650
SECOND_AFTER = 1796195651


class StrictDateTimeBoundsOnADateTime64Key(unittest.TestCase):
    """A strict comparison (`<`, `>`) of a DateTime64 column that is in the
    table's sorting or partition key with a DateTime constant selects no row,
    although the same comparison as an expression is true for the row.

    Workaround: bounds as DateTime64 (`toDateTime64(?, 9)`), as fake-rails'
    telemetry reader does (fake-rails/src/telemetry/query.rs), or inclusive
    bounds (`<=`, `>=`), which are right.
    """

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="chdb-defects-")
        cls.session = Session(cls.dir)
        for name, key in [
            ("sorted", "ORDER BY t"),
            ("partitioned", "PARTITION BY toDate(t) ORDER BY tuple()"),
            ("unkeyed", "ORDER BY tuple()"),
        ]:
            cls.run_sql(f"CREATE TABLE default.{name} (t DateTime64(9)) ENGINE = MergeTree {key}")
            cls.run_sql(f"INSERT INTO default.{name} VALUES ('{ROW}')")

    @classmethod
    def tearDownClass(cls):
        cls.session.close()
        shutil.rmtree(cls.dir, ignore_errors=True)

    @classmethod
    def run_sql(cls, sql):
        result = cls.session.query(sql, "TabSeparated")
        if result.has_error():
            raise AssertionError(f"{sql}: {result.error_message()}")
        return result.bytes().decode().strip()

    def count(self, table, condition):
        return int(self.run_sql(f"SELECT count() FROM default.{table} WHERE {condition}"))

    def test_strict_bounds_drop_the_row_when_the_column_is_a_key(self):
        for table in ["sorted", "partitioned"]:
            with self.subTest(table=table):
                # Defect: both should be 1.
                self.assertEqual(self.count(table, f"t < toDateTime({SECOND_AFTER})"), 0)
                self.assertEqual(self.count(table, f"t > toDateTime({SECOND_BEFORE})"), 0)

    def test_the_expression_itself_is_true(self):
        self.assertEqual(
            self.run_sql(f"SELECT countIf(t < toDateTime({SECOND_AFTER})) FROM default.sorted"),
            "1",
        )

    def test_the_workarounds_select_the_row(self):
        for table in ["sorted", "partitioned", "unkeyed"]:
            with self.subTest(table=table):
                self.assertEqual(self.count(table, f"t < toDateTime64({SECOND_AFTER}, 9)"), 1)
                self.assertEqual(self.count(table, f"t > toDateTime64({SECOND_BEFORE}, 9)"), 1)
                self.assertEqual(self.count(table, f"t <= toDateTime({SECOND_AFTER})"), 1)
                self.assertEqual(self.count(table, f"t >= toDateTime({SECOND_BEFORE})"), 1)
        # Without a key the strict DateTime bound is right too.
        self.assertEqual(self.count("unkeyed", f"t < toDateTime({SECOND_AFTER})"), 1)


if __name__ == "__main__":
    unittest.main()
