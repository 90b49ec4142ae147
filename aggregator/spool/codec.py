"""The spool's payload: a flush batch as bytes and back, each payload led by its format version and a CRC-32.

Pure and in memory: it must never touch a file, nor read a payload it cannot identify (a version it does
not know is refused whole; no pickle).
"""

from __future__ import annotations

import struct
import uuid
import zlib

from aggregator import experiences, meters, store
from aggregator.spool import errors

FORMAT = 1  # the first byte of every payload; a reader refuses versions it does not know
_HEADER = struct.Struct(">BI")  # format version, CRC-32 of the version byte and the body: in every FORMAT
_DOUBLE = struct.Struct(">d")
_CHECKPOINT_TEXT = ("correlation_id", "experience_id", "checkpoint", "type", "feature_category", "urgency",
                    "checkpoint_category")
_CHECKPOINT_TIME = ("client_timestamp", "received_at")
_CHECKPOINT_OPTIONAL = ("outcome", "meta")


# The payload: a version byte, a CRC-32 of that byte and the body, then the body: fields in a fixed
# order. Integers are zigzag varints (any size, exact), floats IEEE doubles, text UTF-8 (lone
# surrogates kept), ids 16 bytes big-endian. A change of a field or its order is a new FORMAT (the
# old one still read); the 5-byte header stays, so a damaged version byte reads as damage.


def encode(batch: store.Batch) -> bytes:
    """``batch`` as bytes in the current FORMAT."""
    out = _Writer()
    metered = batch.meters
    try:
        out.unsigned(int(batch.final) | int(batch.watermark is not None) << 1 | int(metered is not None) << 2)
        out.signed(batch.seq)
        out.signed(batch.events)
        if batch.watermark is not None:
            out.double(batch.watermark)
        out.unsigned(len(batch.windows))
        for start, window in batch.windows.items():
            for number in (start, window.allowed, window.denied):
                out.signed(number)
            out.ids(window.workspaces)
            out.ids(window.users)
        if metered is not None:
            out.unsigned(len(metered.groups))
            for (window_start, meter, group), data in metered.groups.items():
                out.signed(window_start)
                out.texts(meter, group)
                out.dimensions(data.dimensions)
                out.signed(data.quantity)
                out.signed(data.records)
                out.ids([value.int for value in data.distinct])
            out.unsigned(len(metered.identified))
            for (meter, event_id), item in metered.identified.items():
                out.texts(meter, event_id, item.event_id, item.meter)
                out.signed(item.window_start)
                out.texts(item.group)
                out.dimensions(item.dimensions)
                out.signed(item.quantity)
                out.ids([] if item.distinct is None else [item.distinct.int])
        out.unsigned(len(batch.checkpoints))
        for checkpoint in batch.checkpoints:
            out.texts(*(getattr(checkpoint, name) for name in _CHECKPOINT_TEXT))
            for name in _CHECKPOINT_TIME:
                out.double(getattr(checkpoint, name))
            for name in _CHECKPOINT_OPTIONAL:
                out.optional(getattr(checkpoint, name))
    except (TypeError, ValueError, OverflowError, AttributeError, struct.error) as exc:
        raise errors.SpoolError(f"batch {batch.seq} cannot be spooled: {type(exc).__name__}: {exc}") from exc
    body = bytes(out.buffer)
    return _HEADER.pack(FORMAT, zlib.crc32(body, zlib.crc32(bytes([FORMAT])))) + body


def decode(payload: bytes, *, source: str = "spooled batch") -> store.Batch:
    """The batch ``payload`` holds; SpoolVersionError or SpoolCorrupt naming ``source`` if it cannot be read."""
    if len(payload) < _HEADER.size:
        raise errors.SpoolCorrupt(f"{source} is damaged ({len(payload)} bytes, shorter than a header)")
    version, crc = _HEADER.unpack_from(payload)
    if zlib.crc32(payload[_HEADER.size:], zlib.crc32(payload[:1])) != crc:
        raise errors.SpoolCorrupt(f"{source} is damaged (checksum mismatch)")
    if version != FORMAT:
        raise errors.SpoolVersionError(errors.version_message(source, version, FORMAT))
    read = _Reader(payload, _HEADER.size)
    try:
        batch = _decode_v1(read)
        if read.at != len(payload):
            raise ValueError(f"{len(payload) - read.at} bytes left over")
    except (IndexError, ValueError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
        raise errors.SpoolCorrupt(f"{source} cannot be decoded: {exc}") from exc
    return batch


def _decode_v1(read: _Reader) -> store.Batch:
    flags = read.unsigned()
    seq, events = read.signed(), read.signed()
    watermark = read.double() if flags & 2 else None
    windows: dict[int, store.BatchWindow] = {}
    for _ in range(read.unsigned()):
        start, allowed, denied = read.signed(), read.signed(), read.signed()
        windows[start] = store.BatchWindow(workspaces=read.ids(), users=read.ids(), allowed=allowed, denied=denied)
    metered = None
    if flags & 4:
        metered = meters.MeterBatch()
        for _ in range(read.unsigned()):
            key = (read.signed(), read.text(), read.text())
            metered.groups[key] = meters.GroupData(dimensions=read.dimensions(), quantity=read.signed(),
                                                   records=read.signed(),
                                                   distinct={uuid.UUID(int=value) for value in read.ids()})
        for _ in range(read.unsigned()):
            ident = (read.text(), read.text())
            event_id, meter, window_start, group = read.text(), read.text(), read.signed(), read.text()
            dimensions, quantity, distinct = read.dimensions(), read.signed(), read.ids()
            metered.identified[ident] = meters.Identified(
                event_id=event_id, meter=meter, window_start=window_start, group=group, dimensions=dimensions,
                quantity=quantity, distinct=uuid.UUID(int=distinct[0]) if distinct else None)
    checkpoints = []
    for _ in range(read.unsigned()):
        fields: dict[str, str | float | None] = {name: read.text() for name in _CHECKPOINT_TEXT}
        fields.update({name: read.double() for name in _CHECKPOINT_TIME})
        fields.update({name: read.optional() for name in _CHECKPOINT_OPTIONAL})
        checkpoints.append(experiences.Checkpoint(**fields))  # type: ignore[arg-type]
    return store.Batch(seq=seq, windows=windows, events=events, meters=metered, checkpoints=checkpoints,
                       watermark=watermark, final=bool(flags & 1))


class _Writer:
    def __init__(self) -> None:
        self.buffer = bytearray()

    def unsigned(self, number: int) -> None:
        buffer = self.buffer
        while number > 0x7F:
            buffer.append(number & 0x7F | 0x80)
            number >>= 7
        buffer.append(number)  # a negative number fails here: bytes are 0-255

    def signed(self, number: int) -> None:
        self.unsigned(number << 1 if number >= 0 else ~number << 1 | 1)

    def double(self, number: float) -> None:
        self.buffer += _DOUBLE.pack(number)

    def texts(self, *texts: str) -> None:
        for text in texts:
            raw = text.encode("utf-8", "surrogatepass")
            self.unsigned(len(raw))
            self.buffer += raw

    def optional(self, text: str | None) -> None:
        if text is None:
            self.unsigned(0)
        else:
            raw = text.encode("utf-8", "surrogatepass")
            self.unsigned(len(raw) + 1)
            self.buffer += raw

    def dimensions(self, dimensions: dict[str, str]) -> None:
        self.unsigned(len(dimensions))
        for name, value in dimensions.items():
            self.texts(name, value)

    def ids(self, ids: list[int]) -> None:
        self.unsigned(len(ids))
        self.buffer += b"".join([value.to_bytes(16, "big") for value in ids])


class _Reader:
    def __init__(self, data: bytes, at: int) -> None:
        self.data = data
        self.at = at

    def take(self, size: int) -> bytes:
        end = self.at + size
        if end > len(self.data):
            raise IndexError(f"{end - len(self.data)} bytes missing at the end")
        chunk, self.at = self.data[self.at:end], end
        return chunk

    def unsigned(self) -> int:
        number = shift = 0
        while True:
            byte = self.data[self.at]
            self.at += 1
            number |= (byte & 0x7F) << shift
            if byte < 0x80:
                return number
            shift += 7

    def signed(self) -> int:
        number = self.unsigned()
        return ~(number >> 1) if number & 1 else number >> 1

    def double(self) -> float:
        value: float = _DOUBLE.unpack(self.take(8))[0]
        return value

    def text(self) -> str:
        return self.take(self.unsigned()).decode("utf-8", "surrogatepass")

    def optional(self) -> str | None:
        size = self.unsigned()
        return None if size == 0 else self.take(size - 1).decode("utf-8", "surrogatepass")

    def dimensions(self) -> dict[str, str]:
        return {self.text(): self.text() for _ in range(self.unsigned())}

    def ids(self) -> list[int]:
        count = self.unsigned()
        halves = iter(struct.unpack(f">{2 * count}Q", self.take(16 * count)))  # ~2x int.from_bytes per id
        return [high << 64 | low for high, low in zip(halves, halves, strict=True)]
