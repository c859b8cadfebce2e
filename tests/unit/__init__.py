"""Unit tests: no broker and no database server; SQLite files live in tmp_path.

A package, so that these modules' names cannot clash with same-named ones in tests/e2e or
tests/integration under pytest's default import mode.
"""
