"""Scanners and the externalization gate."""
