"""Test engines (spec §3.1): the data plane that sessions grant, one module per engine."""
