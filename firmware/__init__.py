"""MirrorUnit firmware: a remote data-mirroring appliance."""

__version__ = "0.1.0"
