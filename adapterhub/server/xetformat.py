"""The Xet storage formats the server reads: xorbs (chunks of file content, each stored plain, LZ4 or
byte-grouped LZ4) and shards (each file as a list of chunk ranges of xorbs, with its sha256). Pure
functions over bytes; every malformed input raises `BadRequestError`.

Layouts, as xet-core writes them (``xet_core_structures``):

- xorb: chunks, each an 8-byte header (version 0, compressed length u24, scheme u8, uncompressed length
  u24, little-endian) and its data; then, in a stored xorb, a footer that starts with ``XETBLOB`` and ends
  with its own length (u32; the client uploads xorbs without it). Schemes: 0 none, 1 an LZ4 frame, 2 an LZ4 frame of the bytes grouped by position modulo 4.
- shard (as uploaded: without its footer): a 48-byte header (tag, version 2, footer size), then the file
  section: per file a 48-byte header (file hash, flags, entry count), that many segments (xorb hash, flags,
  unpacked bytes, first chunk, end chunk), a verification entry per segment when flag bit 31 is set, and a
  metadata entry (the sha256) when bit 30 is set; a header of all-ones hash ends the section.
- a hash (32 bytes) is written as four little-endian u64; its hex form prints each as 16 hex digits.

Chunk hashes (BLAKE3) are not checked here: the server checks what matters to a commit, the sha256 of
each rebuilt file, and keeps xorbs per uploading repo, so a wrong xorb can only break its own uploads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BadRequestError

MAX_CHUNK_SIZE = 128 * 1024
CHUNK_HEADER = 8
XORB_IDENT = b"XETBLOB"
SHARD_TAG = b"HFRepoMetaData" + bytes(
    [0, 85, 105, 103, 69, 106, 123, 129, 87, 131, 165, 189, 217, 92, 205, 209, 74, 169]
)
SHARD_HEADER = 48
ENTRY = 48
BOOKEND = b"\xff" * 32
FLAG_VERIFICATION = 1 << 31
FLAG_METADATA_EXT = 1 << 30
LZ4_MAGIC = 0x184D2204


def hash_hex(raw: bytes) -> str:
    """A 32-byte Xet hash as the 64 hex digits the protocol names it by."""
    return "".join(f"{int.from_bytes(raw[i : i + 8], 'little'):016x}" for i in range(0, 32, 8))


@dataclass(frozen=True)
class Chunk:
    offset: int  # where its (compressed) data starts in the xorb
    length: int  # compressed length
    scheme: int
    size: int  # uncompressed length


@dataclass(frozen=True)
class Segment:
    xorb: str  # hex
    start: int  # first chunk
    end: int  # one past the last chunk
    size: int  # unpacked bytes


@dataclass(frozen=True)
class ShardFile:
    file_hash: str
    segments: tuple[Segment, ...]
    sha256: str | None

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)


def parse_xorb(data: bytes) -> list[Chunk]:
    """The chunks of a serialized xorb, its structure checked (not its hashes)."""
    chunks: list[Chunk] = []
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos : pos + 7] == XORB_IDENT:
            footer = n - pos
            if footer < 8 or int.from_bytes(data[-4:], "little") > footer:
                raise BadRequestError("the xorb's footer is not valid")
            break
        if n - pos < CHUNK_HEADER:
            raise BadRequestError("the xorb ends inside a chunk header")
        version, scheme = data[pos], data[pos + 4]
        clen = int.from_bytes(data[pos + 1 : pos + 4], "little")
        ulen = int.from_bytes(data[pos + 5 : pos + 8], "little")
        if version != 0 or scheme not in (0, 1, 2):
            raise BadRequestError(f"xorb chunk {len(chunks)}: unknown version {version} or scheme {scheme}")
        if ulen > MAX_CHUNK_SIZE or clen > 2 * MAX_CHUNK_SIZE or (scheme == 0 and clen != ulen):
            raise BadRequestError(f"xorb chunk {len(chunks)}: lengths {clen}/{ulen} are not valid")
        pos += CHUNK_HEADER
        if pos + clen > n:
            raise BadRequestError(f"xorb chunk {len(chunks)} runs past the end of the xorb")
        chunks.append(Chunk(pos, clen, scheme, ulen))
        pos += clen
    if not chunks:
        raise BadRequestError("the xorb holds no chunks")
    return chunks


def chunk_bytes(data: bytes, chunk: Chunk) -> bytes:
    """The uncompressed content of one chunk of ``data`` (a serialized xorb)."""
    raw = data[chunk.offset : chunk.offset + chunk.length]
    if chunk.scheme == 0:
        out = raw
    else:
        out = lz4_frame_decompress(raw, chunk.size)
        if chunk.scheme == 2:
            out = bg4_regroup(out)
    if len(out) != chunk.size:
        raise BadRequestError(f"a xorb chunk holds {len(out)} bytes, its header says {chunk.size}")
    return out


def bg4_regroup(groups: bytes) -> bytes:
    """Undo the byte grouping: group k holds the bytes at positions k, k+4, k+8, ..."""
    n = len(groups)
    split, rem = divmod(n, 4)
    sizes = [split + (1 if rem > k else 0) for k in range(4)]
    out = bytearray(n)
    pos = 0
    for k, size in enumerate(sizes):
        out[k::4] = groups[pos : pos + size]
        pos += size
    return bytes(out)


def lz4_frame_decompress(data: bytes, limit: int) -> bytes:
    """An LZ4 frame (as lz4_flex writes it) decompressed, refusing more than ``limit`` bytes of output."""
    out = bytearray()
    pos = 0
    try:
        while pos < len(data):
            (magic,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame
                pos += 4 + struct.unpack_from("<I", data, pos)[0]
                continue
            if magic != LZ4_MAGIC:
                raise BadRequestError("a xorb chunk is not an LZ4 frame")
            flg = data[pos]
            pos += 2  # FLG, BD
            if flg >> 6 != 1:
                raise BadRequestError("a xorb chunk has an LZ4 frame of an unknown version")
            pos += (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0) + 1  # content size, dict id, HC
            while True:
                (bsize,) = struct.unpack_from("<I", data, pos)
                pos += 4
                if bsize == 0:
                    break
                stored, bsize = bsize & 0x80000000, bsize & 0x7FFFFFFF
                block = data[pos : pos + bsize]
                if len(block) != bsize:
                    raise BadRequestError("an LZ4 block runs past the end of its chunk")
                pos += bsize + (4 if flg & 0x10 else 0)
                if stored:
                    out += block
                else:
                    _lz4_block(block, out, limit)
                if len(out) > limit:
                    raise BadRequestError("a xorb chunk decompresses to more than its header says")
            pos += 4 if flg & 0x04 else 0
    except (IndexError, struct.error):
        raise BadRequestError("a xorb chunk has a truncated LZ4 frame") from None
    return bytes(out)


def _lz4_block(src: bytes, out: bytearray, limit: int) -> None:
    """Append the decompressed LZ4 block ``src`` to ``out`` (earlier output is the match window)."""
    i, n = 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            while True:
                b = src[i]
                i += 1
                lit += b
                if b != 255:
                    break
        if i + lit > n:
            raise BadRequestError("an LZ4 block's literals run past its end")
        out += src[i : i + lit]
        i += lit
        if i >= n:
            break  # the last sequence has literals only
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        ml = token & 15
        if ml == 15:
            while True:
                b = src[i]
                i += 1
                ml += b
                if b != 255:
                    break
        ml += 4
        start = len(out) - offset
        if offset == 0 or start < 0 or len(out) + ml > limit:
            raise BadRequestError("an LZ4 block refers outside its output")
        if ml <= offset:
            out += out[start : start + ml]
        else:  # the match overlaps what it writes: a repeating pattern
            pattern = bytes(out[start:])
            q, r = divmod(ml, offset)
            out += pattern * q + pattern[:r]


def parse_shard(data: bytes) -> list[ShardFile]:
    """The files a shard describes (each with its segments and, when given, its sha256)."""
    if len(data) < SHARD_HEADER or data[:32] != SHARD_TAG:
        raise BadRequestError("the body is not a Xet shard (wrong magic number)")
    (version,) = struct.unpack_from("<Q", data, 32)
    if version != 2:
        raise BadRequestError(f"Xet shard version {version} is not supported (version 2 is)")
    files: list[ShardFile] = []
    pos = SHARD_HEADER
    try:
        while True:
            file_hash = data[pos : pos + 32]
            if len(file_hash) != 32:
                raise BadRequestError("the shard's file section has no end marker")
            flags, count = struct.unpack_from("<II", data, pos + 32)
            pos += ENTRY
            if file_hash == BOOKEND:
                break
            segments = []
            for _ in range(count):
                xorb = data[pos : pos + 32]
                _flags, size, start, end = struct.unpack_from("<IIII", data, pos + 32)
                if len(xorb) != 32 or end <= start:
                    raise BadRequestError("a shard file segment is not valid")
                segments.append(Segment(hash_hex(xorb), start, end, size))
                pos += ENTRY
            if flags & FLAG_VERIFICATION:
                pos += ENTRY * count
            sha256 = None
            if flags & FLAG_METADATA_EXT:
                raw = data[pos : pos + 32]
                if len(raw) != 32:
                    raise BadRequestError("a shard file's metadata runs past the end")
                sha256 = hash_hex(raw)
                pos += ENTRY
            files.append(ShardFile(hash_hex(file_hash), tuple(segments), sha256))
    except struct.error:
        raise BadRequestError("the shard is truncated") from None
    return files
