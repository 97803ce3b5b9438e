"""Rule sources the supervisor reads in-process (the TOML file of standalone mode).

Sources that need an event loop (the control process, an edge link) run as
children and talk to the supervisor over a channel instead; see arbiter.py.
"""

from __future__ import annotations

from portunus.config import ConfigError, Settings, load_standalone
from portunus.logs import log_event
from portunus.rules import Rule
from portunus.supervisor.arbiter import RuleSource


class TomlSource(RuleSource):
    """Standalone TOML file: read at start; re-read on SIGHUP.

    An invalid file on reload changes nothing: the error is logged with every
    ``file:line`` and the running rules stay as they are.
    """

    name = "toml"

    def __init__(self, path: str, initial: list[Rule] | None = None) -> None:
        self.path = path
        self._initial = initial
        self._settings: Settings | None = None
        self._errors: list[str] = []

    def load(self) -> list[Rule] | None:
        if self._initial is not None:
            rules, self._initial = self._initial, None
            return rules
        try:
            self._settings, rules = load_standalone(self.path)
        except ConfigError as exc:
            self._settings, self._errors = None, exc.errors
            log_event(
                "config.invalid",
                level="error",
                path=self.path,
                errors=exc.errors,
                hint="fix the file and send SIGHUP again; the running rules are unchanged",
            )
            return None
        log_event("config.reloaded", path=self.path, rules=len(rules))
        return rules

    def loaded_settings(self) -> Settings:
        """The top-level settings of the last ``load`` (for SettingsReloader);
        raises ConfigError when that load found the file invalid."""
        if self._settings is None:
            raise ConfigError(self._errors or [f"{self.path}: not loaded"])
        return self._settings
