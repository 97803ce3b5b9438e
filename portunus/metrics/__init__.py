"""Metrics shared by every process: the catalog of series and the multiprocess value store.

A leaf package: it imports nothing from the supervisor, shards, control, edge or
web code, so each of them (and the separately installed edge client) can use it.
"""
