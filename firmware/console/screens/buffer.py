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
            v, q = st.get("volume", {}), st.get("cbq", {})
            return [f"Now: volume {format_size(int(v.get('size', 0)))}B, buffer "
                    f"{format_size(int(q.get('ring_bytes', 0)))}B, {q.get('fill', 0):.1%} full,"
                    f" high-water {q.get('high_water', 0):.0%}, mode {q.get('mode')}"]
        self.config_form("buffer and volume", BUFFER_FIELDS, info)
