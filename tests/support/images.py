"""Hostile image bytes for the tests."""
import struct
import zlib


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height while its data holds a few rows: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
            + chunk(b"IEND", b""))
