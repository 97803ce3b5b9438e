"""The client picker shared by the rules filter, the push form, the grant form and
the owner-caps page.

A server may carry ten thousand clients: a ``<select>`` of all of them is neither
readable nor cheap.  One ``clients.list`` page of at most ``CHOICE_LIMIT`` clients
is read; when the fleet is larger (``next_cursor`` set) the template shows a text
input with those names as a ``<datalist>`` instead, so any client's name or id can
still be typed (control resolves either).  The ``client_picker`` macro in
``_macros.html`` renders both forms.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from portunus.web.routes.common import call

CHOICE_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class ClientOption:
    """One choice: the submitted ``value`` (the name), the shown ``text``, and the id
    so a value given by id still marks its option as selected."""

    value: str
    text: str
    client_id: str = ""


@dataclass(frozen=True, slots=True)
class ClientChoice:
    options: list[ClientOption]
    typed: bool  # more clients than listed: a text input with a datalist, not a select


async def client_choice(
    request: Request,
    *,
    first: tuple[tuple[str, str], ...] = (),
    mark_offline: bool = False,
) -> ClientChoice:
    """The first ``CHOICE_LIMIT`` clients the caller may see, after the fixed
    ``first`` options (e.g. ``("*", "* (every client)")``); ``mark_offline`` adds
    " (offline)" to the text of clients not connected."""
    page = await call(request, "clients.list", {"limit": CHOICE_LIMIT})
    options = [ClientOption(value, text) for value, text in first]
    for c in page["clients"]:
        name = str(c["client_name"])
        text = f"{name} (offline)" if mark_offline and not c.get("connected") else name
        options.append(ClientOption(name, text, str(c.get("client_id", ""))))
    return ClientChoice(options, typed=bool(page.get("next_cursor")))
