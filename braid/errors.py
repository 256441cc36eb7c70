"""Errors the engine raises to its callers."""


class EngineDeadError(RuntimeError):
    """The engine-core process has died; no request can complete. The server answers 503."""


class EngineStartupError(RuntimeError):
    """The engine core failed while starting (bad model, out of memory, ...)."""
