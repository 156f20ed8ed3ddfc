"""Clients of hmt-serve that need only httpx: `hmt chat`, the terminal chat."""
