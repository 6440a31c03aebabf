"""multipart/form-data bodies (OpenAI's audio uploads), parsed with the standard library.

Envoy hands the body over whole (google.api.HttpBody), at most gateway.max_request_bytes;
the email package's MIME parser reads it, binary parts byte for byte. A part's transfer
encoding (base64, quoted-printable) only ever shrinks it, so what the parts decode to is
bounded by the body. Their number is bounded before parsing: the parser's cost grows with
it (40,000 one-byte fields in 3.5 MB took 7 s of CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP

from clawdbot.common.errors import GatewayError

# Parts one upload may have: OpenAI's transcription form has about ten fields.
MAX_PARTS = 64


@dataclass(frozen=True)
class FormPart:
    data: bytes
    filename: str | None
    content_type: str

    def text(self, name: str) -> str:
        try:
            return self.data.decode()
        except UnicodeDecodeError:
            raise GatewayError.bad_request(
                f"The form field '{name}' is not UTF-8 text.", name, "invalid_value"
            ) from None


def _bad(message: str) -> GatewayError:
    return GatewayError.bad_request(message, None, "invalid_multipart")


def parse_form(content_type: str, body: bytes) -> dict[str, FormPart]:
    """Fields by name. Raises GatewayError(400) when the body is not multipart/form-data."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise GatewayError.bad_request(
            f"This route takes multipart/form-data (a file upload), not {content_type or 'a body without a type'}.",
            None,
            "invalid_content_type",
        )
    if "boundary=" not in content_type:
        raise _bad("The multipart/form-data content type has no boundary.")
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_boundary()
    if not boundary:
        raise _bad("The multipart/form-data content type has no boundary.")
    # Every part starts with a delimiter line and the body ends with one more: counting
    # them is cheap, and overcounts at worst (a delimiter-like line inside a part).
    if body.count(b"--" + boundary.encode("utf-8", "surrogateescape")) > MAX_PARTS + 1:
        raise _bad(f"The multipart/form-data body has more than {MAX_PARTS} parts.")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not message.is_multipart() or message.defects:
        raise _bad("The multipart/form-data body is malformed: " + (", ".join(map(str, message.defects)) or "no parts"))
    parts: dict[str, FormPart] = {}
    payload = message.get_payload()
    for part in payload if isinstance(payload, list) else ():
        if not isinstance(part, Message):
            continue
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise _bad("A part of the multipart/form-data body has no name.")
        data = part.get_payload(decode=True)
        filename = part.get_filename()
        parts[name] = FormPart(data if isinstance(data, bytes) else b"", filename, part.get_content_type())
    if not parts:
        raise _bad("The multipart/form-data body has no fields.")
    return parts
