"""The buffer and volume screen: their sizes and the buffer's high-water mark."""

from __future__ import annotations

from ...config.schema import format_size
from ..forms import FormField, Forms

BUFFER_FIELDS = [
    FormField("volume.size", "Volume size", help="e.g. 64G, or auto"),
    FormField("buffer.size", "Buffer size", help="e.g. 8G, or auto"),
    FormField("buffer.high_water", "High-water mark", help="0.5 .. 0.95 or 80%"),
]


class BufferScreen(Forms):
    """Volume and buffer sizes, with what the unit uses now."""

    def buffer_screen(self) -> None:
        def info() -> list[str]:
            st, _ = self.unit_status()
            if st is None:
                return ["Local unit not running."]
            v, q = st["volume"], st["cbq"]
            return [f"Now: volume {format_size(v['size'])}B, buffer "
                    f"{format_size(q['ring_bytes'])}B, {q['fill']:.1%} full,"
                    f" high-water {q['high_water']:.0%}, mode {q['mode']}"]
        self.config_form("buffer and volume", BUFFER_FIELDS, info)
