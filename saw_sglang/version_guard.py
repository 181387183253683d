"""Refuse SGLang versions whose internals the patches were not written against."""

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from saw_sglang import SUPPORTED_SGLANG


class UnsupportedSGLangVersion(RuntimeError):
    pass


def installed_sglang_version() -> str:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError as e:
        raise UnsupportedSGLangVersion(
            f"saw-sglang needs SGLang {SUPPORTED_SGLANG}, but SGLang is not installed. "
            f"Install it with: pip install 'sglang{SUPPORTED_SGLANG}'"
        ) from e


def check_sglang_version(version: str | None = None) -> str:
    """Return the installed SGLang version, or raise naming the supported range."""
    version = version or installed_sglang_version()
    if Version(version) not in SpecifierSet(SUPPORTED_SGLANG):
        raise UnsupportedSGLangVersion(
            f"saw-sglang supports SGLang {SUPPORTED_SGLANG}; found SGLang {version}. "
            f"Install a supported version: pip install 'sglang{SUPPORTED_SGLANG}'"
        )
    return version
