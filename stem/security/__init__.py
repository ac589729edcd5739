"""Payload signing, TLS settings and development certificates."""
