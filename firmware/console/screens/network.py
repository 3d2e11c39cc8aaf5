"""The network screen: address mode, address, netmask, gateway and DNS."""

from __future__ import annotations

from ..forms import FormField, Forms

NETWORK_FIELDS = [
    FormField("network.mode", "Address mode", ("dhcp", "static")),
    FormField("network.address", "Address"),
    FormField("network.netmask", "Netmask / prefix"),
    FormField("network.gateway", "Gateway"),
    FormField("network.dns", "DNS servers", help="comma-separated"),
]


class NetworkScreen(Forms):
    """The unit's network settings."""

    def network_screen(self) -> None:
        self.config_form("network", NETWORK_FIELDS)
