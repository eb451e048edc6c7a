"""Errors raised by every decoder and validator in protocols/.

Every decode/validate function raises a :class:`CodecError` subclass on bad input and nothing else.
``code`` is a stable machine code (used as the problem+json ``code``); ``field`` names the offending
field or header when there is one.
"""

from __future__ import annotations

__all__ = [
    "AlgorithmUnknown",
    "AuthHeaderInvalid",
    "CardFormatInvalid",
    "CiphertextInvalid",
    "CodecError",
    "EcardCodeMalformed",
    "HotlistBlockInvalid",
    "IdNumberInvalid",
    "KeyInvalid",
]


class CodecError(ValueError):
    """Bad input to a codec or validator. ``code`` is stable; ``field`` is optional."""

    default_code: str = "codec_error"

    def __init__(self, code: str | None = None, message: str | None = None, field: str | None = None) -> None:
        self.code: str = code if code is not None else self.default_code
        self.field: str | None = field
        self.message: str = message if message is not None else self.code
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, field={self.field!r}, message={self.message!r})"


class AlgorithmUnknown(CodecError):
    default_code = "algorithm_unknown"


class KeyInvalid(CodecError):
    default_code = "public_key_invalid"


class CiphertextInvalid(CodecError):
    default_code = "ciphertext_invalid"


class IdNumberInvalid(CodecError):
    default_code = "id_number_format"


class CardFormatInvalid(CodecError):
    default_code = "card_no_invalid"


class EcardCodeMalformed(CodecError):
    default_code = "ecard_code_malformed"


class HotlistBlockInvalid(CodecError):
    default_code = "hotlist_block_invalid"


class AuthHeaderInvalid(CodecError):
    default_code = "auth_malformed"
