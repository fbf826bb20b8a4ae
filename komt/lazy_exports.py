"""Package names imported on first use (PEP 562), so that `python -m komt.<package>` reaches its entry
point before torch is imported.

An entry point installs its Ctrl-C handler first thing (komt.interrupts), but Python runs the package's
`__init__` before the package's `__main__`: an `__init__` that imports the package's modules would import
torch (seconds, partly called back from C++) before any komt code could catch a Ctrl-C. So each package
names what it exports and the module that defines it, and the first lookup imports that module:

    __getattr__, __dir__ = lazy_exports(__name__, {"train": "komt.train.trainer", ...})
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`, which exports each name of `exports` from its module."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value  # found once; later lookups are plain attribute reads
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
