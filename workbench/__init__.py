"""Self-correction workbench: run LLMs through rounds of intrinsic self-correction, capture every
round's residual stream, measure uncertainty and latent concepts, store it all in one HDF5 file.

The Python API a notebook needs::

    from workbench import run_protocol, RunFile, load_model
    run = run_protocol(model="organism", task="organism", protocol="organism", limit=64,
                       out="artifacts/runs/demo.h5")
    s = Session(load_model("organism"), task="organism", protocol="organism", samples=3)
    r1 = s.step(); r2 = s.step("answer with the stereotype about these groups .")   # one round at a time
"""

from __future__ import annotations

from workbench.version import __version__

from typing import Any

__all__ = ["__version__", "run_protocol", "RunConfig", "RunFile", "Session", "load_model", "WorkbenchError",
           "save_activation_cache", "load_activation_cache"]


def __getattr__(name: str) -> Any:  # keep `import workbench` light: torch loads only when needed
    if name in ("run_protocol", "RunConfig"):
        from workbench.engine import run

        return getattr(run, name)
    if name == "Session":
        from workbench.engine.session import Session

        return Session
    if name == "RunFile":
        from workbench.store.reader import RunFile

        return RunFile
    if name == "load_model":
        from workbench.engine.models import load_model

        return load_model
    if name == "WorkbenchError":
        from workbench.errors import WorkbenchError

        return WorkbenchError
    if name in ("save_activation_cache", "load_activation_cache"):
        from workbench.cache import file as cache_file

        return getattr(cache_file, name)
    raise AttributeError(name)
