"""Helpers shared by the test folders (tests/conftest.py puts tests/ on sys.path)."""
