"""Dependencies over ``app.state`` shared by the routers."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..errors import NotReady


def server_state(request: Request):
    return request.app.state.server


State = Annotated[object, Depends(server_state)]


def ready_state(state: State):
    """The server state once the model is loaded; 503 before."""
    if not state.ready.is_set():
        detail = f"model failed to load: {state.load_error}" if state.load_error else "the model is loading"
        raise NotReady(detail)
    return state


Ready = Annotated[object, Depends(ready_state)]
