"""The spool's errors, and the message for a payload or file in a format this code does not read.

Shared by the codec and the file so both name a damaged or foreign payload the same way; it must never
import the rest of the spool (everything in it imports this).
"""

from __future__ import annotations

from aggregator import exceptions


class SpoolError(exceptions.StoreError):
    """The local spool could not be written or read; check the spool directory's free space and permissions."""


class SpoolCorrupt(SpoolError):
    """A spool file cannot be read; set it aside (``Spool.set_aside()``) and go on with the others."""


class SpoolVersionError(SpoolError):
    """A spool file was written in a format this version of aggregator does not read."""


def version_message(source: str, version: int, known: int) -> str:
    return (f"{source} is in format version {version}, and this version of aggregator reads version {known} "
            "only: it was written by another version of aggregator; run that version (or a newer one) on this "
            "host to replay it, then this one")
