"""The reference delivery API."""
