"""Text from someone else's file: decoded strictly, tokenised in bounded pieces.

A binary file or a latin-1 one read as UTF-8 "with replacement" turns into text full of U+FFFD
that calibrates nothing, silently; it is refused instead, with what to do about it. Fast
tokenizers slow down badly on one enormous line (a 46 MB line took minutes and GBs), so long text
is tokenised in pieces of at most ``CHUNK_CHARS`` characters, cut just before a blank line or a
space so that the pieces give the same tokens as the whole (a piece then starts where the
tokenizer's own pre-splitting would cut anyway).
"""

from __future__ import annotations

from .errors import DataError

CHUNK_CHARS = 1 << 16
BINARY_SAMPLE = 1 << 13


def decode_text(raw: bytes, name: str) -> str:
    """``raw`` as UTF-8 text; refuses binary data and other encodings with a clear message."""
    if b"\x00" in raw[:BINARY_SAMPLE]:
        raise DataError(
            f"'{name}' looks like a binary file (it contains NUL bytes), not text. "
            "Use a .txt or .jsonl file of plain text."
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"'{name}' is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}). "
            "Convert it to UTF-8 first, e.g. iconv -f latin1 -t utf-8."
        ) from None


def check_length(text: str, split: str, most: int | None) -> None:
    """Refuse text longer than ``most`` characters (None: any length)."""
    if most is not None and len(text) > most:
        raise DataError(
            f"The {split} text has {len(text):,} characters; this server reads at most "
            f"{most:,}. Use a shorter text."
        )


def tokenize_in_chunks(tokenizer, text: str, chunk: int = CHUNK_CHARS) -> list[int]:
    """Token ids of ``text`` without special tokens, tokenised piece by piece."""
    ids: list[int] = []
    for piece in split_text(text, chunk):
        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False).input_ids)
    return ids


def split_text(text: str, chunk: int) -> list[str]:
    """Pieces of at most ``chunk`` characters, each cut before a blank line or a space."""
    pieces, start = [], 0
    while len(text) - start > chunk:
        window = text[start : start + chunk]
        cut = window.rfind("\n\n")
        if cut <= 0:
            cut = window.rfind(" ")
        if cut <= 0:
            cut = chunk  # no space at all: a hard cut (only such text can tokenise differently)
        pieces.append(text[start : start + cut])
        start += cut
    pieces.append(text[start:])
    return pieces
