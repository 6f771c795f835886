"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` with a 4xx for anything the client
can fix, so that clients written for OpenAI (the `openai` package raises BadRequestError, NotFoundError,
RateLimitError, ... from the status) report our errors the way they report OpenAI's. A 500 keeps this shape
too and never carries a traceback (that goes to the server's log)."""

from __future__ import annotations

from typing import Any

# status -> OpenAI's error type for it
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request that fails with `status` and a one-line `message`; `param` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line (and the field it is about) from pydantic's error list: the first error, as `field: reason`."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # pydantic names the union member it tried ("messages.0.content.str"); the field is what the client wrote
    loc = [part for part in loc if part not in ("str", "list[str]", "list[int]", "list[TextPart]", "int")]
    field = ".".join(loc) or None
    reason = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        reason = "not a supported field"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{field}: {reason}{more}" if field else f"{reason}{more}"), field
