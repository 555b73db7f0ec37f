"""`make bench`: Reflector measured side by side against its anchors on loopback (see run.py)."""
