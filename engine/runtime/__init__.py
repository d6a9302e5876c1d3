"""The multi-process engine: the in-process `Engine` API, its loop, the stage workers and their supervisor."""
from omni2.engine.runtime.engine import Engine, EngineError

__all__ = ["Engine", "EngineError"]
