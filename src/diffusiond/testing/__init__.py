"""Helpers for driving diffusiond from tests and benchmarks: waits, requests, servers.

Shared by tests/ and bench/ (which must not import from tests/); nothing in the server
imports this package.
"""
