"""``make bench``: the relay's performance, measured against a floor.

The pieces: :mod:`bench.loadgen` (an asyncio SMTP load generator),
:mod:`bench.nullapi` (a delivery API that answers 201 and keeps nothing),
:mod:`bench.floor` (a bare ``twisted.mail`` ESMTP server: the framework's
floor), :mod:`bench.procs` (processes, CPU and memory readings) and
:mod:`bench.scenarios` (the six scenarios of ``bench/README.md``).
``python -m bench`` runs them and prints one table.
"""
