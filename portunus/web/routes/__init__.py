"""The /v1 routes, one module per noun; each exposes ``routes``."""
