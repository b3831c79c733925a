"""The PNG check that runs before libpng sees a file (:func:`hrad.data.images.decode_raw`).

libpng reports a broken file by printing "libpng error: ..." to stderr itself, and a file it
decodes but dislikes by printing "libpng warning: ...", neither of which any log level silences.
So a PNG's chunks are walked (lengths, critical chunks' CRCs and order, IEND) and its pixel data
inflated (one zlib stream, the header's rows, valid filter types) first: a broken file becomes
the one line hrad raises (:func:`png_damage`), and a whole one reaches libpng without what
libpng would only warn about (:func:`png_for_libpng`), an ancillary chunk whose CRC does not
match included: libpng drops it with a warning, PIL's header parser (the size check before the
decode) refuses the whole file, so it sees the file without it too (:func:`png_head_without_bad_chunks`).
Plain byte arithmetic and zlib; imports nothing of hrad.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PngWalk(NamedTuple):
    """What :func:`png_damage` learns of a PNG on its way: why it is broken (None when whole),
    its chunks as ``(kind, first byte, end)`` (not the ancillary ones whose CRC does not match:
    ``dropped`` counts those), and how many bytes of its IDAT data the zlib stream takes (None
    when not inflated)."""

    damage: str | None
    chunks: list[tuple[bytes, int, int]]
    stream_bytes: int | None = None
    dropped: int = 0


def png_damage(data: memoryview) -> PngWalk:
    """Why a PNG is broken: a chunk cut off by the end of the file, a critical chunk whose CRC
    does not match, a chunk libpng refuses where it stands (:func:`_png_chunk_misplaced`), no
    IEND, or pixel data that does not inflate (:func:`_png_pixel_damage`).

    Checked before OpenCV decodes, because libpng reports such a file by printing "libpng
    error: ..." to stderr itself. An ancillary chunk whose CRC does not match is no damage
    (libpng drops it with a "libpng warning: ...: CRC error" line): it is left out of the walk's
    chunks, so :func:`png_for_libpng` leaves it out of what libpng gets. Costs one CRC pass over
    the bytes already read and one inflate of the pixel data.
    """
    size = len(data)
    position = len(PNG_SIGNATURE)
    pixel_data: list[memoryview] = []
    chunks: list[tuple[bytes, int, int]] = []
    seen: set[bytes] = set()  # the kinds of the chunks so far
    previous = b""
    dropped = 0
    while position + 8 <= size:
        length = int.from_bytes(data[position : position + 4], "big")
        kind = bytes(data[position + 4 : position + 8])
        name = kind.decode("ascii") if kind.isalpha() else f"unnamed chunk {kind!r}"
        end = position + 12 + length
        if end > size:
            return PngWalk(f"the file ends at byte {size}, inside its {name} chunk of {length} bytes", chunks)
        crc_matches = zlib.crc32(data[position + 4 : end - 4]) == int.from_bytes(data[end - 4 : end], "big")
        if kind[:1].isupper() and not crc_matches:
            return PngWalk(f"CRC mismatch in its {name} chunk at byte {position}", chunks)
        if not kind.isalpha():
            return PngWalk(f"an invalid chunk type {kind!r} at byte {position}", chunks)
        misplaced = _png_chunk_misplaced(kind, length, seen, previous, palette=data[25] == 3)
        if misplaced is not None:
            return PngWalk(f"{name} chunk at byte {position}: {misplaced}", chunks)
        if crc_matches:
            chunks.append((kind, position, end))
        else:  # an ancillary chunk: dropped, as libpng does
            dropped += 1
        if kind == b"IDAT":
            pixel_data.append(data[position + 8 : end - 4])
        if kind == b"IEND":
            if not pixel_data:
                return PngWalk("no IDAT chunk before its IEND", chunks)
            damage, stream_bytes = _png_pixel_damage(data[16:29], pixel_data)
            return PngWalk(damage, chunks, stream_bytes, dropped)
        seen.add(kind)
        previous = kind
        position = end
    return PngWalk(f"the file ends at byte {size}, before the IEND chunk", chunks)


#: The one ancillary chunk whose loss would change the decoded pixels (the alpha it gives).
_PNG_KEPT_ANCILLARY = b"tRNS"
_PNG_END = b"\0\0\0\0IEND\xaeB`\x82"  # an empty IEND chunk with its CRC


def png_for_libpng(data: np.ndarray, walk: PngWalk) -> np.ndarray:
    """The PNG ``data`` as libpng decodes it without a word: a file libpng decodes but warns
    about ("libpng warning: iCCP: known incorrect sRGB profile", "gAMA: out of place", "IDAT:
    Extra compressed data", "PLTE: ignored in grayscale PNG", "IEND: invalid") prints that line
    to stderr for every image, so a folder of such files floods a run's output. The pixels never
    depend on what it warns about (OpenCV applies no gamma, colour profile or text), so the copy
    keeps IHDR, a PLTE before the pixel data of a colour image, a tRNS there (its alpha, unless
    its CRC does not match: libpng drops it then), the IDAT data cut to the zlib stream's own
    bytes, and an empty IEND. ``data`` itself when that
    is what it already is (a copy of the compressed bytes otherwise, small next to the decoded
    image). A stream that inflates to more than the rows need still gets libpng's "Too much
    image data"."""
    pixel_start = next(start for kind, start, _ in walk.chunks if kind == b"IDAT")
    gray = data[25] in (0, 4)
    kept = [
        (kind, start, end)
        for kind, start, end in walk.chunks
        if kind in (b"IHDR", b"IDAT", b"IEND")
        or (start < pixel_start and (kind == _PNG_KEPT_ANCILLARY or (kind == b"PLTE" and not gray)))
    ]
    idat_bytes = sum(end - start - 12 for kind, start, end in kept if kind == b"IDAT")
    stream_bytes = walk.stream_bytes if walk.stream_bytes is not None else idat_bytes
    end_whole = data[walk.chunks[-1][1] :].tobytes() == _PNG_END
    if not walk.dropped and len(kept) == len(walk.chunks) and stream_bytes >= idat_bytes and end_whole:
        return data
    raw = data.data
    parts = [bytes(raw[: len(PNG_SIGNATURE)])]
    for kind, start, end in kept:
        if kind == b"IDAT" and start == pixel_start:  # the pixel data as one chunk of the stream's own bytes
            stream = b"".join(bytes(raw[s + 8 : e - 4]) for k, s, e in kept if k == b"IDAT")[:stream_bytes]
            parts += [stream_bytes.to_bytes(4, "big"), b"IDAT", stream, zlib.crc32(b"IDAT" + stream).to_bytes(4, "big")]
        elif kind not in (b"IDAT", b"IEND"):
            parts.append(bytes(raw[start:end]))
    parts.append(_PNG_END)
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def png_head_without_bad_chunks(handle: BinaryIO, size: int) -> bytes | None:
    """The PNG in ``handle`` (``size`` bytes, read from the signature on) as a header parser
    reads it, from the signature to its first IDAT chunk's length and type, without the
    ancillary chunks there whose CRC does not match, when it has any; else None. ``handle`` is
    back where it was either way. PIL's header parser refuses such a file ("broken PNG file (bad
    header checksum in b'tEXt')") where libpng only drops the chunk, as :func:`png_damage` does.
    A chunk cut off by the end of the file ends the copy: the parser's own verdict on it stands."""
    start = handle.tell()
    parts = [handle.read(len(PNG_SIGNATURE))]
    position, dropped = start + len(PNG_SIGNATURE), False
    while True:
        top = handle.read(8)
        length = int.from_bytes(top[:4], "big")
        kind = top[4:8]
        if len(top) < 8 or kind == b"IDAT" or position + 12 + length > size:
            parts.append(top)
            break
        body = handle.read(length + 4)
        matches = zlib.crc32(body[:-4], zlib.crc32(kind)) == int.from_bytes(body[-4:], "big")
        if not matches and kind[:1].islower() and kind.isalpha():
            dropped = True
        else:
            parts += [top, body]
        position += 12 + length
        if kind == b"IEND":
            break
    handle.seek(start)
    return b"".join(parts) if dropped else None


#: The critical chunks (upper-case first letter) PNG defines; libpng refuses any other.
_PNG_CRITICAL = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})


def _png_chunk_misplaced(kind: bytes, length: int, seen: set[bytes], previous: bytes, palette: bool) -> str | None:
    """Why libpng refuses chunk ``kind`` (four letters) of ``length`` bytes after chunks of the
    kinds ``seen``, the last a ``previous`` (None when it takes it): the format's rules on
    critical chunks, each a "libpng error: ..." line of its own. Ancillary chunks out of place are only warned about by libpng
    (a "libpng warning: ..." line), and left to it."""
    if kind[:1].islower():
        return None
    if kind not in _PNG_CRITICAL:
        return "an unknown critical chunk"
    if kind == b"IHDR" and seen:
        return "a second IHDR"
    if kind == b"PLTE" and palette and (length == 0 or length % 3 or length > 3 * 256):
        return "not 1-256 RGB palette entries"
    if kind == b"IDAT" and palette and b"PLTE" not in seen:
        return "pixel data of a palette image before its PLTE chunk"
    if kind == b"IDAT" and b"IDAT" in seen and previous != b"IDAT":
        return "not next to the IDAT chunks before it"
    return None


#: Samples a pixel by PNG colour type (gray, RGB, palette, gray + alpha, RGBA).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Adam7's passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
#: Compressed bytes inflated at a time, and the most output one step may make: a zlib bomb's
#: output is counted, never held, and the check's own peak is about 1.25 MB whatever the image.
_INFLATE_INPUT, _INFLATE_OUTPUT = 2**18, 2**20


def _png_pixel_damage(header: memoryview, pixel_data: list[memoryview]) -> tuple[str | None, int | None]:
    """Why a PNG's pixel data does not decode (None when it does), and the bytes its zlib stream
    takes (None when not inflated; bytes after it are dropped by :func:`png_for_libpng`): the IDAT chunks together must
    be one whole zlib stream that inflates to at least the rows the header calls for, each row
    starting with a filter type 0-4 - what libpng refuses with a "libpng error: ..." line of its
    own. Inflated output is checked step by step and dropped, so this costs one inflate's time
    (0.4-0.9x OpenCV's decode of the same file, best of 7 on 2048x2048 and 4096x4096 RGB), not
    its memory. A stream that inflates to more than the rows need is left to libpng, which decodes
    such a file (with a "libpng warning: ..." line of its own).
    """
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    if colour not in _PNG_SAMPLES or interlace not in (0, 1):
        return None, None  # PIL's header parser accepted it; whatever libpng says of it is its verdict
    bits = _PNG_SAMPLES[colour] * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    rows: list[tuple[int, int, int]] = []  # (first byte, rows, bytes a row including the filter type)
    expected = 0
    for column, row, column_step, row_step in passes:
        pass_width = max(0, -(-(width - column) // column_step))
        pass_height = max(0, -(-(height - row) // row_step))
        if pass_width and pass_height:  # empty passes have no rows at all
            row_bytes = 1 + -(-pass_width * bits // 8)
            rows.append((expected, pass_height, row_bytes))
            expected += pass_height * row_bytes
    inflater = zlib.decompressobj()
    done = fed = 0
    try:
        for piece in _pieces(pixel_data, _INFLATE_INPUT):
            if inflater.eof:
                break
            fed += len(piece)
            pending = piece
            while not inflater.eof:
                output = inflater.decompress(pending, _INFLATE_OUTPUT)
                pending = inflater.unconsumed_tail
                bad = _bad_filter_type(output, done, expected, rows)
                if bad is not None:
                    return f"a row of its pixel data has filter type {bad}, not 0-4", None
                done += len(output)
                if not pending and len(output) < _INFLATE_OUTPUT:  # a full output may have more to come
                    break
    except zlib.error as error:
        # zlib says "Error -3 while decompressing data: incorrect data check": the part after the colon
        return f"its pixel data is not a valid zlib stream: {' '.join(str(error).split()).rpartition(': ')[2]}", None
    if not inflater.eof:
        return f"its pixel data ends inside its zlib stream, after {done} of the {expected} bytes its {width}x{height} header calls for", None
    if done < expected:
        return f"its pixel data inflates to {done} bytes, its {width}x{height} header calls for {expected}", None
    return None, fed - len(inflater.unused_data)


def _pieces(parts: list[memoryview], size: int) -> Iterator[bytes]:
    """The bytes of ``parts`` one after another in pieces of about ``size`` bytes: a file of
    many small IDAT chunks is inflated in few steps, a large chunk in several."""
    pending: list[memoryview] = []
    total = 0
    for part in parts:
        for start in range(0, len(part), size):
            pending.append(part[start : start + size])
            total += len(pending[-1])
            if total >= size:
                yield b"".join(pending)
                pending, total = [], 0
    if pending:
        yield b"".join(pending)


def _bad_filter_type(output: bytes, offset: int, expected: int, rows: list[tuple[int, int, int]]) -> int | None:
    """The first filter type over 4 among the rows that start inside ``output`` (which begins at
    byte ``offset`` of the inflated pixel data), or None."""
    values = np.frombuffer(output, dtype=np.uint8)
    stop = min(offset + len(values), expected)
    for first, count, row_bytes in rows:
        low = max(0, -(-(offset - first) // row_bytes))
        high = min(count, -(-(stop - first) // row_bytes))
        if low < high:
            types = values[first + np.arange(low, high) * row_bytes - offset]
            if (types > 4).any():
                return int(types[np.argmax(types > 4)])
    return None


__all__ = ["PNG_SIGNATURE", "PngWalk", "png_damage", "png_for_libpng", "png_head_without_bad_chunks"]
