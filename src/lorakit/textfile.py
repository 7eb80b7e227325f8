"""Reading a whole user-given text file as UTF-8, with the line of a bad byte in the error."""

from __future__ import annotations

from pathlib import Path


def read_utf8(
    path: Path, expected: str, error: type[ValueError] = ValueError, encoding: str = "utf-8"
) -> str:
    """The text of `path` decoded with `encoding` (utf-8, or utf-8-sig to drop a BOM).

    Raises:
        `error` (a ValueError): `PATH:LINE: not valid UTF-8 (byte 0x..); expected <expected>`.
    """
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise error(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); expected {expected}"
        ) from err
