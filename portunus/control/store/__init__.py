"""state.db: schema migrations, the async store of the control process, and the
synchronous helpers for the supervisor and the offline CLI verbs."""

from __future__ import annotations

from portunus.control.store.db import Store, audit_refusal, write_audit
from portunus.control.store.migrations import LATEST, SchemaTooNew, utc_now
from portunus.control.store.offline import backup, bootstrap_superadmin, check_schema

__all__ = [
    "LATEST",
    "SchemaTooNew",
    "Store",
    "audit_refusal",
    "backup",
    "bootstrap_superadmin",
    "check_schema",
    "utc_now",
    "write_audit",
]
