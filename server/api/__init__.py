"""HTTP routes, one router per resource. Routes are thin: validate, hand over to the engine, shape the answer."""
from fastapi import APIRouter

from ..schemas import ERROR_RESPONSES

from . import completions, export, generate, health, learn, tasks

router = APIRouter(responses=ERROR_RESPONSES)
for module in (health, generate, completions, tasks, learn, export):
    router.include_router(module.router)
