"""Helpers shared by the 3GSync tests (loopback servers and fault injection)."""
