"""Benchmarks of aggregator against its peers (issue #4): one run, one table, one JSON file.

``python -m bench`` runs them all (``--quick`` for a smoke run with small sizes). Rows live one noun
per module: ``hotpath`` (track() cost), ``memory``, ``postgres`` (flush and collect), ``daemon`` (HTTP
ingest); ``run`` is the command line, ``figures`` the table, ``workload`` and ``databases`` the setup.
"""
