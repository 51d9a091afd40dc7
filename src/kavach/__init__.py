"""kavach: run untrusted commands in a scored sandbox."""
