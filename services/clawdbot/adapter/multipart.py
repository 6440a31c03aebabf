"""multipart/form-data bodies (OpenAI's audio uploads), parsed with the standard library.

Envoy hands the body over whole (google.api.HttpBody); the email package's MIME parser
reads it, binary parts byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP

from clawdbot.common.errors import GatewayError


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
