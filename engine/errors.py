"""The project's one exception hierarchy. Only the ingress turns these into HTTP answers."""


class ServingError(Exception):
    """Base of every error a request can end with; `status_code` is the HTTP status it maps to."""

    status_code: int = 500


class InvalidRequestError(ServingError):
    """The request is malformed or asks for something the model cannot do (HTTP 400)."""

    status_code = 400


class ContextLengthError(InvalidRequestError):
    """Prompt plus `max_new_tokens` can never fit in the model's context (HTTP 400)."""


class NotSupportedError(InvalidRequestError):
    """A valid field that this server does not implement yet (HTTP 400)."""


class UnauthorizedError(ServingError):
    """No API key, or not one of the configured keys (HTTP 401)."""

    status_code = 401


class PayloadTooLargeError(ServingError):
    """The request body is larger than the configured limit (HTTP 413)."""

    status_code = 413


class ModelNotFoundError(ServingError):
    """No served model has this name (HTTP 404)."""

    status_code = 404


class OverloadedError(ServingError):
    """The model's queue is full (HTTP 429)."""

    status_code = 429


class ModelUnavailableError(ServingError):
    """The model has no replica able to answer right now (HTTP 503)."""

    status_code = 503


class RequestTimeoutError(ServingError):
    """A generation ran past the model's `request_timeout_s`; it is aborted (HTTP 504)."""

    status_code = 504


class EngineDeadError(ServingError):
    """The engine stopped (a broken device, a crash, shutdown); every open and new request gets this
    (HTTP 503: Serve's health check replaces the replica, so retrying later reaches a live one)."""

    status_code = 503


class RequestFailedError(ServingError):
    """Generating this one request failed on the server (HTTP 500); other requests go on."""

    status_code = 500
