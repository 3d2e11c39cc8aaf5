"""Forms: fields edited one by one, then saved to the config store in one validated
update and pushed to the running unit where that can be done live."""

from __future__ import annotations

import curses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, ConfigStoreError
from ..config.live import apply_live
from ..config.schema import SCHEMA
from .base import DOWN_KEYS, ENTER_KEYS, ESC, UP_KEYS, ConsoleBase


@dataclass
class FormField:
    key: str
    label: str
    choices: tuple[str, ...] = ()
    to_text: Callable[[Any], str] | None = None
    from_text: Callable[[str], Any] | None = None
    help: str = ""

    def text(self, value: Any) -> str:
        if self.to_text is not None:
            return self.to_text(value)
        return SCHEMA[self.key].type.display(value)

    def parse(self, text: str) -> Any:
        if self.from_text is not None:
            return self.from_text(text)
        return SCHEMA[self.key].type.parse(self.key, text)


class Forms(ConsoleBase):
    """Editing and saving a form of config fields."""

    def edit_form(self, title: str, fields: list[FormField], values: dict[str, Any],
                  save_label: str = "save", info: Callable[[], list[str]] | None = None,
                  raw_keys: set[str] | None = None,
                  draft: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Edit `values` field by field; returns the changed values on save, None on Esc.
        `draft` resumes an edit whose save was refused."""
        raw_keys = raw_keys or set()
        draft = dict(values) if draft is None else dict(draft)
        sel = 0
        while True:
            self.frame(title, f"arrows: move   Enter: edit   s: {save_label}   Esc: back")
            for i, f in enumerate(fields):
                v = draft[f.key]
                text = v if f.key in raw_keys else f.text(v)
                mark = "*" if draft[f.key] != values[f.key] else " "
                self.put(2 + i, 1, f"{mark}{f.label:<22}", curses.A_REVERSE if i == sel else 0)
                self.put(2 + i, 25, text[:self.w - 27])
            y = 3 + len(fields)
            if fields[sel].choices:
                self.put(y, 2, "Choices: " + ", ".join(fields[sel].choices))
            elif fields[sel].help:
                self.put(y, 2, fields[sel].help)
            for j, line in enumerate(info() if info else []):
                self.put(y + 2 + j, 2, line)
            self.scr.refresh()
            k = self.key()
            if k in UP_KEYS:
                sel = (sel - 1) % len(fields)
            elif k in DOWN_KEYS:
                sel = (sel + 1) % len(fields)
            elif k in ENTER_KEYS:
                f = fields[sel]
                current = draft[f.key] if f.key in raw_keys else f.text(draft[f.key])
                while True:
                    text = self.edit_line(2 + sel, 25, current, width=min(54, self.w - 26))
                    if text is None:
                        self.say("")
                        break
                    try:
                        draft[f.key] = text.strip() if f.key in raw_keys else f.parse(text)
                    except ConfigError as e:
                        self.say(f"Refused: {e}")
                        self.show_message()
                        current = text
                        continue
                    self.say("")
                    break
            elif k == ord("s"):
                return {key: v for key, v in draft.items() if v != values[key]}
            elif k in (ESC, ord("q")):
                if draft != values and not self.confirm("Discard the changes?"):
                    continue
                self.say("Nothing changed.")
                return None

    def save(self, changes: dict[str, Any]) -> bool:
        if not changes:
            self.say("No change.")
            return True
        if not self.unlock():
            return False
        try:
            result = self.s.store.update(changes)
        except (ConfigError, ConfigStoreError) as e:
            self.say(f"Refused, nothing saved: {e}")
            return False
        report = apply_live(result.diff, result.config, self.s.control,
                            network=self.s.apply_network)
        live = [k for k, _ in report.applied]
        restart = [k for k, _ in report.restart]
        # One failure (networkctl) often covers several keys: say it once.
        failed: dict[str, list[str]] = {}
        for k, m in report.errors:
            failed.setdefault(m, []).append(k)
        self.say(f"Saved (generation {result.generation}). "
                 + (f"Applied now: {', '.join(live)}. " if live else "")
                 + (f"Needs restart: {', '.join(restart)}." if restart else "")
                 + "".join(f" FAILED {', '.join(ks)}: {m}" for m, ks in failed.items()))
        return True

    def config_form(self, title: str, fields: list[FormField],
                    info: Callable[[], list[str]] | None = None) -> None:
        draft: dict[str, Any] | None = None
        while True:
            cfg = self.config()
            if cfg is None:
                return
            values = {f.key: cfg[f.key] for f in fields}
            changes = self.edit_form(title, fields, values, info=info, draft=draft)
            if changes is None or self.save(changes):
                return
            # Refused: the form stays with what was typed so it can be corrected.
            draft = {**values, **changes}
