"""Small helpers shared by the patch modules: wrap an attribute once, and tell
whether a server / runner / configurator runs the INT4 KV cache (saw_sglang.config.is_int4)."""

from __future__ import annotations

import functools
import sys
import types

from saw_sglang.config import is_int4  # noqa: F401  (the patches' one INT4 test)

_MARK = "__saw_original__"


def wrap(owner, name: str, make_wrapper, *, kind: str = "method"):
    """Replace `owner.name` with `make_wrapper(original)` unless already ours.

    kind: "method", "staticmethod" or "classmethod" (class attributes), or
    "function" (module attribute; stale `from x import name` bindings in loaded
    modules are rebound too). Returns True when it patched, False when it was
    already patched (idempotence)."""
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    fn = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    if getattr(fn, _MARK, None) is not None:
        return False
    new = make_wrapper(fn)
    functools.update_wrapper(new, fn)
    setattr(new, _MARK, fn)
    if kind == "staticmethod":
        setattr(owner, name, staticmethod(new))
    elif kind == "classmethod":
        setattr(owner, name, classmethod(new))
    else:
        setattr(owner, name, new)
    if kind == "function" and isinstance(owner, types.ModuleType):
        for mod in list(sys.modules.values()):
            if isinstance(mod, types.ModuleType) and mod is not owner:
                try:
                    if vars(mod).get(name) is fn:
                        setattr(mod, name, new)
                except TypeError:
                    pass
    return True


def original(fn):
    """The unpatched function behind one of our wrappers (fn itself otherwise)."""
    fn = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn
    return getattr(fn, _MARK, fn)

