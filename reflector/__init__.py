"""Reflector: a self-hosted, key-authenticated network-measurement endpoint for PacketParamedic."""

__version__ = "0.1.0"

__all__ = ["__version__"]
