"""CPU-test-only stand-in for torchvision.

SGLang 0.5.17 runs `from torchvision.io import decode_jpeg` at import time. Real
torchvision from the package index would replace the CPU torch with a multi-GB
CUDA build, and `--no-deps torchvision` cannot load its operators against our
torch. This shim answers any `torchvision.*` module or attribute with a
placeholder that raises only when called, so imports succeed and any real use
fails loudly. It is put on sys.path by the test virtualenv only (see Makefile);
it is never installed with the package.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+saw-cpu-shim"


class _Placeholder:
    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._name} is a CPU-test placeholder: real torchvision is not installed"
        )

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")


class _ShimModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _ShimModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _ShimModule
