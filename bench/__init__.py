"""Ratio benchmarks: Portunus against direct connections and the peer forwarders.

Run with ``python -m bench.run``; see bench/run.py. Loopback only.
"""
