"""How a token is stored and what a user name may be: the two facts about
identities that both the running control process (``auth``) and the offline
storage verbs (``store.offline``, before any process runs) need.  A leaf, so
neither has to import the other."""

from __future__ import annotations

import hashlib
import re

from portunus.errors import PortunusError

_USER_NAME = re.compile(r"[A-Za-z0-9_.@\-]{1,64}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def validate_user_name(name: str) -> str:
    if not isinstance(name, str) or not _USER_NAME.fullmatch(name.strip()):
        raise PortunusError(
            "validation.name",
            "user name must be 1-64 letters, digits or _ . @ -",
            field="name",
        )
    return name.strip()
