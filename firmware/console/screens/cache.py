"""The cache mode screen: write-through or write-back."""

from __future__ import annotations

from ..forms import FormField, Forms

CACHE_FIELDS = [FormField("cache.mode", "Cache mode", ("write-through", "write-back"))]


class CacheScreen(Forms):
    """The volume's cache mode, with a warning without a UPS."""

    def cache_screen(self) -> None:
        def info() -> list[str]:
            cfg = self.config()
            lines = ["write-through: a write completes once it is on disk.",
                     "write-back: completes from RAM; safe only with a working UPS."]
            if cfg is not None and cfg["ups.model"] == "none":
                lines.append("WARNING: no UPS is configured (ups.model = none).")
            return lines
        self.config_form("cache mode", CACHE_FIELDS, info)
