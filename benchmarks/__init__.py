"""Benchmarks: side-by-side comparisons that print tables (not part of the test run)."""
