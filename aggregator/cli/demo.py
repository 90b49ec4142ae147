"""`demo`: replica processes, live windows, reports checked against the truth.

The handler only: it must never define flags nor exit the process itself; ``aggregator.demo`` runs it.
"""

from __future__ import annotations

import argparse

from aggregator import demo, units


def run(args: argparse.Namespace) -> int:
    return demo.run(replicas=args.replicas, window=units.parse_duration(args.window, key="--window"),
                    duration=units.parse_duration(args.duration, key="--duration"),
                    flush_interval=units.parse_duration(args.flush_interval, key="--flush-interval"),
                    database_url=args.database_url or None)
