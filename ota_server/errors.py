"""HTTP errors as JSON ``{"error": "message"}``."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error answer (4xx, 5xx) of the server."""

    error: str = Field(description="what is wrong, for a human", examples=["device not found"])


def error_doc(description: str) -> dict[str, Any]:
    """OpenAPI response object of an error (the schema inline: FastAPI would document a ``model`` under the
    route's own media type, text/plain or none)."""
    return {"description": description, "content": {"application/json": {"schema": ErrorBody.model_json_schema()}}}


#: documented on every operation (FastAPI's default 422 ``{"detail": [...]}`` is never sent); a route that
#: documents one of these codes itself replaces the entry, with ``error_doc`` too
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error_doc("invalid request (malformed body or parameters)"),
    401: error_doc("missing or invalid credentials (admin token, or the token of an accepted device)"),
    "4XX": error_doc("other client errors: 403 bad download link, 404 unknown id, 409 conflict, 413 too large, "
                     "416 unsatisfiable range"),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> APIError:
    return APIError(400, message)


def not_found(what: str) -> APIError:
    return APIError(404, f"{what} not found")


T = TypeVar("T")


def found_or_404(value: T | None, what: str) -> T:
    """``value`` (a row read by its id), when there is one.

    Raises:
        APIError: 404 "<what> not found" when it is None.
    """
    if value is None:
        raise not_found(what)
    return value


def conflict(message: str) -> APIError:
    return APIError(409, message)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, {"WWW-Authenticate": "Bearer"})
