"""Benchmark harness: ``python -m bench [small|stream1000|reload|all] [--quick]`` (see bench/README.md)."""
