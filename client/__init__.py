"""Python client and CLI for jumplora-server, over HTTP (imports neither the server nor torch).

    from client import Client
    with Client("http://127.0.0.1:8000") as c:
        print(c.generate("@stack", "Hello", max_new_tokens=16).text)
"""
from .api import (AsyncClient, AsyncJob, AsyncTextStream, Client, Generation, Job, Task, TextStream,
                  extract_checkpoint)
from .errors import (APIError, AuthenticationError, BadRequestError, ConflictError, InvalidRequestError, JobFailed,
                     JumploraConnectionError, JumploraError, JumploraTimeoutError, NotFoundError, NotReadyError,
                     PayloadTooLargeError, PermissionDeniedError, RateLimitError, RequestTimeoutError, ServerError,
                     UnsafeArchiveError)

__all__ = [
    "Client", "AsyncClient", "Generation", "Task", "Job", "AsyncJob", "TextStream", "AsyncTextStream",
    "extract_checkpoint",
    "JumploraError", "APIError", "BadRequestError", "AuthenticationError", "PermissionDeniedError", "NotFoundError",
    "ConflictError", "PayloadTooLargeError", "InvalidRequestError", "RateLimitError", "ServerError", "NotReadyError",
    "RequestTimeoutError", "JumploraConnectionError", "JumploraTimeoutError", "JobFailed", "UnsafeArchiveError",
]
