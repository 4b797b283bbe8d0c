"""HTTP errors as JSON ``{"error": "message"}``."""

from __future__ import annotations


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


def conflict(message: str) -> APIError:
    return APIError(409, message)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, {"WWW-Authenticate": "Bearer"})
