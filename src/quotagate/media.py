"""Images, audio and documents in a request: a conservative token figure for each, from the
providers' published formulas, instead of the tokens of their base64 text.

Where the image's bytes are in the request, its width and height are read from its header (PNG,
GIF, WebP, JPEG) and the formula applied; where they are not (a URL, a file id), the largest figure
the formula can give. PDF pages are counted from the document's page objects. docs/counting.md
("Estimates") lists the figures and where they come from.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
import zlib
from collections.abc import Callable
from typing import Any

# OpenAI, tile models (gpt-4o, gpt-4.1, gpt-5, o-series): base + per 512 px tile, after fitting the
# image in 2048 x 2048 and scaling its short side to 768; gpt-4o-mini bills 2,833 + 5,667 per tile.
TILE_BASE, TILE = 85, 170
MINI_BASE, MINI_TILE = 2833, 5667
# OpenAI, patch models (gpt-4.1-mini/nano, o4-mini, gpt-5-mini/nano, gpt-5.4): 32 px patches, at most
# 1,536 (x the largest multiplier, 2.46) or 2,500 (x 1.2); "original" detail up to 10,000 patches.
PATCH_CAPS = ((1536, 2.46), (2500, 1.2))
ORIGINAL_PATCHES, ORIGINAL_MULTIPLIER = 10_000, 1.2
OPENAI_IMAGE_MAX = math.ceil(1536 * 2.46)  # 3,779: the largest figure of any model but gpt-4o-mini
# Anthropic: 28 x 28 px per token (the older formula: width * height / 750), at most 3.75 megapixels.
ANTHROPIC_IMAGE_MAX = 5000  # 3.75 MP / 750; in 28 px patches with padding, at most ~4,920
# Documents: every PDF page is billed as its text and an image of the page.
PAGE_TEXT = 3000
MAX_PAGES = 100  # the providers' limit per document; assumed when the pages cannot be counted
# Audio: OpenAI bills 10 tokens a second of input audio; a second is at least 1,000 bytes (8 kbit/s).
AUDIO_BYTES_PER_TOKEN = 100

HEAD_BYTES = 65_536  # enough of an image's start to find its size
PDF_INFLATE_LIMIT = 16 * 1024 * 1024

Handler = Callable[[dict[str, Any], str, str], tuple[int, tuple[str, ...]]]


# -- the item shapes -------------------------------------------------------------------------------


def _openai_image_url(item: dict[str, Any], provider: str, model: str) -> tuple[int, tuple[str, ...]]:
    """Chat completions: {"type": "image_url", "image_url": {"url": ..., "detail": ...}}."""
    inner = item.get("image_url")
    url, detail = (inner.get("url"), inner.get("detail")) if isinstance(inner, dict) else (inner, None)
    return image_tokens(_data_of(url), provider, model, detail), ("image_url",)


def _input_image(item: dict[str, Any], provider: str, model: str) -> tuple[int, tuple[str, ...]]:
    """Responses: {"type": "input_image", "image_url": ..., "file_id": ..., "detail": ...}."""
    data = _data_of(item.get("image_url"))
    return image_tokens(data, provider, model, item.get("detail")), ("image_url", "file_id", "detail")


def _input_audio(item: dict[str, Any], provider: str, model: str) -> tuple[int, tuple[str, ...]]:
    """Chat completions: {"type": "input_audio", "input_audio": {"data": base64, "format": ...}}."""
    inner = item.get("input_audio")
    data = inner.get("data") if isinstance(inner, dict) else None
    return audio_tokens(_b64_size(data) if isinstance(data, str) else 0), ("input_audio",)


def _openai_file(item: dict[str, Any], provider: str, model: str) -> tuple[int, tuple[str, ...]]:
    """Chat completions: {"type": "file", "file": {"file_data": data URL, "file_id", "filename"}}."""
    inner = item.get("file")
    data = _data_of(inner.get("file_data")) if isinstance(inner, dict) else None
    return document_tokens(data, provider, model), ("file",)


def _input_file(item: dict[str, Any], provider: str, model: str) -> tuple[int, tuple[str, ...]]:
    """Responses: {"type": "input_file", "file_data" | "file_url" | "file_id", "filename"}."""
    data = _data_of(item.get("file_data"))
    return document_tokens(data, provider, model), ("file_data", "file_url", "file_id")


def _anthropic_image(item: dict[str, Any], provider: str, model: str) -> tuple[int, tuple[str, ...]]:
    """Messages: {"type": "image", "source": {"type": "base64" | "url" | "file", ...}}."""
    source = item.get("source")
    data = source.get("data") if isinstance(source, dict) and source.get("type") == "base64" else None
    return image_tokens(data if isinstance(data, str) else None, provider, model, None), ("source",)


def _anthropic_document(item: dict[str, Any], provider: str, model: str) -> tuple[int, tuple[str, ...]]:
    """Messages: a document whose source is a PDF (base64, URL, file) counts by pages; a text or
    content source is walked as text."""
    source = item.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind in ("text", "content") or not isinstance(source, dict):
        return 0, ()
    data = source.get("data") if kind == "base64" else None
    return document_tokens(data if isinstance(data, str) else None, provider, model), ("source",)


HANDLERS: dict[str, Handler] = {
    "image_url": _openai_image_url,
    "input_image": _input_image,
    "input_audio": _input_audio,
    "file": _openai_file,
    "input_file": _input_file,
    "image": _anthropic_image,
    "document": _anthropic_document,
}


# -- figures ---------------------------------------------------------------------------------------


def image_tokens(data: str | None, provider: str, model: str, detail: Any) -> int:
    """An image's figure: from its size where its bytes are here, else the formula's largest."""
    size = image_size(_head(data)) if data else None
    if provider == "anthropic":
        return anthropic_image(size)
    return openai_image(size, model, detail)


def anthropic_image(size: tuple[int, int] | None) -> int:
    if size is None:
        return ANTHROPIC_IMAGE_MAX
    w, h = size
    return min(ANTHROPIC_IMAGE_MAX, max(math.ceil(w / 28) * math.ceil(h / 28), math.ceil(w * h / 750)))


def openai_image(size: tuple[int, int] | None, model: str, detail: Any) -> int:
    if model.startswith("gpt-4o-mini"):
        return MINI_BASE if detail == "low" else _tiles(size, MINI_BASE, MINI_TILE)
    if detail == "original":
        patches = _patches(size, ORIGINAL_PATCHES)
        return math.ceil(patches * ORIGINAL_MULTIPLIER)
    tiles = TILE_BASE if detail == "low" else _tiles(size, TILE_BASE, TILE)
    return max(tiles, *(math.ceil(_patches(size, cap) * factor) for cap, factor in PATCH_CAPS))


def _tiles(size: tuple[int, int] | None, base: int, tile: int) -> int:
    """Fit in 2048 x 2048, scale the short side to 768, count 512 px tiles (8 at most)."""
    if size is None:
        return base + 8 * tile
    fit = min(1.0, 2048 / max(size))
    scale = 768 / (min(size) * fit)
    width, height = size[0] * fit * scale, size[1] * fit * scale
    return base + tile * min(8, math.ceil(width / 512) * math.ceil(height / 512))


def _patches(size: tuple[int, int] | None, cap: int) -> int:
    if size is None:
        return cap
    w, h = size
    return min(cap, math.ceil(w / 32) * math.ceil(h / 32))


def audio_tokens(size: int) -> int:
    return max(10, math.ceil(size / AUDIO_BYTES_PER_TOKEN))


def document_tokens(data: str | None, provider: str, model: str) -> int:
    """Pages times (text per page + a page image); PDFs' pages counted, else the providers' limit."""
    per_page = PAGE_TEXT + (ANTHROPIC_IMAGE_MAX if provider == "anthropic" else openai_image(None, model, None))
    if data is None:
        return MAX_PAGES * per_page
    if not (_decode(data, 16) or b"").startswith(b"%PDF"):
        return max(per_page, _b64_size(data))  # another kind of file: a token per byte at most
    raw = _decode(data)
    return (pdf_pages(raw) if raw is not None else MAX_PAGES) * per_page


def work(item: dict[str, Any]) -> int:
    """How much reading a media item costs, in characters: the documents' data is decoded whole."""
    if item.get("type") not in ("document", "file", "input_file"):
        return 64
    total = 0
    for value in item.values():
        inner = value.values() if isinstance(value, dict) else (value,)
        total += sum(len(v) for v in inner if isinstance(v, str))
    return max(total, 64)


# -- reading bytes ---------------------------------------------------------------------------------


def _data_of(value: Any) -> str | None:
    """The base64 part of a data: URL (None for a URL the provider fetches, or anything else)."""
    if not isinstance(value, str) or not value.startswith("data:"):
        return None
    comma = value.find(",", 0, 256)
    return value[comma + 1 :] if comma >= 0 else None


def _b64_size(data: str) -> int:
    return len(data) * 3 // 4


def _decode(data: str, limit: int | None = None) -> bytes | None:
    text = data if limit is None else data[: limit // 3 * 4]
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _head(data: str) -> bytes:
    return _decode(data, HEAD_BYTES) or b""


def image_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from the start of a PNG, GIF, WebP or JPEG file."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        return _positive(struct.unpack(">II", head[16:24]))
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return _positive(struct.unpack("<HH", head[6:10]))
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        return _webp_size(head)
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(head)
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", head[26:30])
        return _positive((w & 0x3FFF, h & 0x3FFF))
    return None


_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """The frame header's size, skipping segments by their lengths."""
    at = 2
    while at + 9 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:
            at += 1
            continue
        length = struct.unpack(">H", head[at + 2 : at + 4])[0]
        if marker in _SOF:
            h, w = struct.unpack(">HH", head[at + 5 : at + 9])
            return _positive((w, h))
        at += 2 + length
    return None


def _positive(size: tuple[int, int]) -> tuple[int, int] | None:
    w, h = size
    return (w, h) if w > 0 and h > 0 else None


_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_COUNT = re.compile(rb"/Count\s+(\d{1,6})")  # page trees' (and outlines') counts: at least the pages
_KIDS = re.compile(rb"/Kids\s*\[([^\]]*)\]")  # a page tree's children (pages and inner nodes)
_REF = re.compile(rb"\d+\s+\d+\s+R")
SCAN_LIMIT = 10_000  # escaped names or /Kids arrays read at most; a PDF with more counts the page limit
_ESCAPED_NAME = re.compile(rb"/[!-~]{0,30}?#[0-9A-Fa-f]{2}[!-~]{0,30}")
_STRUCTURE = frozenset({b"Type", b"Page", b"Pages", b"Count", b"Kids", b"ObjStm", b"Filter", b"FlateDecode"})
_FLATE = re.compile(rb"/Filter\s*(?:/FlateDecode|\[\s*/FlateDecode\s*\])(?![A-Za-z#])")


class _Unreadable(Exception):
    """The PDF hides its structure from this reading: names spelled with escapes, object streams
    in a filter other than Flate (or that do not inflate)."""


def pdf_pages(raw: bytes) -> int:
    """Pages of a PDF: the most of its page objects, its page trees' counts and their children,
    including those in compressed object streams; the providers' limit when none can be found, or
    when the PDF spells a structural name with `#xx` escapes or packs objects in a stream this
    reading cannot inflate (where pages could hide from the count)."""
    try:
        if b"#" in raw and _escaped_structure(raw):
            raise _Unreadable
        text = raw + _object_streams(raw) if b"/ObjStm" in raw else raw
        kids = _kids(text)
    except _Unreadable:
        return MAX_PAGES
    pages = len(_PAGE.findall(text))
    counts = [int(c) for c in _COUNT.findall(text)]
    found = max([pages, kids, *counts])
    return min(max(found, 1), MAX_PAGES) if found else MAX_PAGES


def _kids(text: bytes) -> int:
    """References in the page trees' `/Kids` arrays, each array read from its `[` to the first `]`
    (searched no further than the last `]`: every byte is read once); enough for the page limit."""
    total = 0
    for index, listed in enumerate(_KIDS.finditer(text, 0, text.rfind(b"]") + 1)):
        if index >= SCAN_LIMIT:
            raise _Unreadable
        total += len(_REF.findall(listed[1]))
        if total >= MAX_PAGES:
            break
    return total


def _escaped_structure(raw: bytes) -> bool:
    """A name of the page structure spelled with `#xx` escapes (`/P#61ge` is `/Page`)."""
    for index, match in enumerate(_ESCAPED_NAME.finditer(raw)):
        if index >= SCAN_LIMIT:
            return True
        name = re.sub(rb"#([0-9A-Fa-f]{2})", lambda m: bytes([int(m[1], 16)]), match[0][1:])
        if any(name.startswith(word) for word in _STRUCTURE):
            return True
    return False


def _object_streams(raw: bytes) -> bytes:
    """The inflated contents of the object streams of a PDF, at most PDF_INFLATE_LIMIT bytes;
    `_Unreadable` for one in another filter (or several), with a predictor, or that does not inflate."""
    out: list[bytes] = []
    left = PDF_INFLATE_LIMIT
    at = raw.find(b"/ObjStm")
    while at >= 0 and left > 0:
        start = raw.find(b"stream", at, at + 4096)
        if start < 0:
            break
        head = raw[max(0, raw.rfind(b"obj", 0, at)) : start]
        start += 6
        start += 2 if raw[start : start + 2] == b"\r\n" else 1
        end = raw.find(b"endstream", start)
        end = len(raw) if end < 0 else end
        if b"/Filter" in head:
            if not _FLATE.search(head) or b"/Predictor" in head:
                raise _Unreadable
            try:
                data = zlib.decompressobj().decompress(memoryview(raw)[start:end], left)
            except zlib.error:
                raise _Unreadable from None
        else:
            data = b""  # not compressed: read where it stands
        out.append(data)
        left -= len(data)
        at = raw.find(b"/ObjStm", end)
    return b"".join(out)
