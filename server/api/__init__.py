"""HTTP routes, one router per resource. Routes are thin: validate, hand over to the engine, shape the answer."""
from fastapi import APIRouter

from . import completions, generate, health, learn, tasks

router = APIRouter()
for module in (health, generate, completions, tasks, learn):
    router.include_router(module.router)
