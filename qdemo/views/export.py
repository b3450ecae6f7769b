"""CSV text for the downloads and API answers."""

from __future__ import annotations


def csv_text(frame) -> str:
    """RFC 4180 CSV (CRLF rows), so a token that is a bare carriage return or form feed is quoted and reads back
    as one cell instead of breaking the row."""
    return frame.to_csv(index=False, lineterminator="\r\n")
