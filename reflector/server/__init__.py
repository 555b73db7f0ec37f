"""The endpoint's I/O shells: the control-port listener, the link protocol and the service."""
