"""Who may connect: the allowlist, pairing windows and pre-authentication admission."""
