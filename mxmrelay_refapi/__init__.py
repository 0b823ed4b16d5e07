"""The reference delivery API: the relay's stand-in for the platform.

It stores each send the relay POSTs (``docs/delivery-api.yaml``, v1) in
SQLite and serves the transactional reports over them, so the relay can be
run, tested and demonstrated end to end.  It runs on its own
(``twistd mxmrelay-refapi --config FILE``) and imports nothing of the
relay: it is an independent reading of the contract.
"""
