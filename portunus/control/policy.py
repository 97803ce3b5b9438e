"""Who may call what: the one authorization decision of the control process.

``POLICY`` maps every RPC method to the least a caller must be:

- ``public``: nobody needs to be anyone (health, login, first-run setup);
- ``authenticated``: any identity, even one that must change its password
  first (who am I, change my password, log out);
- ``user``: any role; the handler then narrows to the caller's own rules,
  granted clients, own tokens and grants (``require_owner``, ``require_self``);
- ``superadmin``: users, grants of others, clients, audit, owner caps.

Every HTTP route maps onto one RPC method, so the web process decides nothing:
``authorize`` below runs in the ``Dispatcher`` for every request, before any
handler.  A method without an entry is refused (``internal``) rather than
served: tests enumerate the method table and every route against ``POLICY``.

Cookie (session) callers must also prove the request is not cross-site on
writes: the web process checks ``X-Portunus-CSRF: 1`` and ``Origin`` and passes
the verdict as ``csrf``; bearer-token callers need neither.
"""

from __future__ import annotations

from typing import Final

from portunus.control.auth import Principal
from portunus.errors import PortunusError

PUBLIC: Final = "public"
AUTHENTICATED: Final = "authenticated"
USER: Final = "user"
SUPERADMIN: Final = "superadmin"

POLICY: dict[str, str] = {
    "health": PUBLIC,
    "auth.login": PUBLIC,
    "auth.setup": PUBLIC,
    "auth.whoami": AUTHENTICATED,
    "auth.logout": AUTHENTICATED,
    "users.me": AUTHENTICATED,
    "users.me.password": AUTHENTICATED,
    "rules.push": USER,
    "rules.list": USER,
    "rules.get": USER,
    "rules.update": USER,
    "rules.remove": USER,
    "rules.retry": USER,
    "rules.stats": USER,
    "clients.list": USER,
    "clients.get": USER,
    "users.get": USER,
    "tokens.issue": USER,
    "tokens.list": USER,
    "tokens.revoke": USER,
    "grants.list": USER,
    "traffic.query": USER,
    "rules.counts": USER,
    "traffic.summary": USER,
    "clients.enroll": SUPERADMIN,
    "clients.rename": SUPERADMIN,
    "clients.revoke": SUPERADMIN,
    "clients.delete": SUPERADMIN,
    "audit.list": SUPERADMIN,
    "users.add": SUPERADMIN,
    "users.list": SUPERADMIN,
    "users.remove": SUPERADMIN,
    "users.passwd": SUPERADMIN,
    "grants.add": SUPERADMIN,
    "grants.revoke": SUPERADMIN,
    "owner_caps.list": SUPERADMIN,
    "owner_caps.get": SUPERADMIN,
    "owner_caps.set": SUPERADMIN,
    "owner_caps.delete": SUPERADMIN,
}

# Methods that change nothing: a session may call them without the CSRF header.
READS: frozenset[str] = frozenset(
    {
        "health",
        "auth.whoami",
        "users.me",
        "rules.list",
        "rules.get",
        "rules.stats",
        "clients.list",
        "clients.get",
        "audit.list",
        "users.list",
        "users.get",
        "tokens.list",
        "grants.list",
        "owner_caps.list",
        "owner_caps.get",
        "rules.counts",
        "traffic.query",
        "traffic.summary",
    }
)


def policy_of(method: str) -> str:
    level = POLICY.get(method)
    if level is None:
        raise PortunusError(
            "internal", f"method {method!r} has no authorization policy; refusing it"
        )
    return level


def authorize(method: str, who: Principal, csrf: bool) -> None:
    """Raise the contract's 403 when ``who`` may not call ``method`` at all."""
    level = policy_of(method)
    if level == PUBLIC:
        return
    if who.via_session and method not in READS and not csrf:
        raise PortunusError(
            "csrf_failed",
            "a write from a browser session needs the header X-Portunus-CSRF: 1 and a same-origin Origin",
        )
    if level == AUTHENTICATED:
        return
    if who.password_change_required:
        raise PortunusError(
            "password_change_required",
            "change your password first (POST /v1/users/me/password, or the Web UI)",
        )
    if level == SUPERADMIN and not who.is_superadmin:
        raise PortunusError(
            "role_required", f"{method} needs the superadmin role", required_role="superadmin"
        )


def require_self(who: Principal, user_id: str, what: str) -> None:
    """A ``user`` may act on its own tokens and grants only."""
    if not who.is_superadmin and user_id != who.user:
        raise PortunusError(
            "role_required",
            f"{what} of another user need the superadmin role",
            required_role="superadmin",
        )


def require_owner(who: Principal, owner: str, rule_id: int) -> None:
    """A ``user`` sees and changes its own rules only; rules owned by nobody
    (created before users existed) belong to the superadmins."""
    if not who.is_superadmin and owner != who.user:
        raise PortunusError(
            "not_owner",
            f"rule {rule_id} belongs to another user; you may act on your own rules only",
            id=rule_id,
        )
