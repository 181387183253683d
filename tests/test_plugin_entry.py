import importlib
import importlib.metadata as md

import pytest

from saw_sglang import SUPPORTED_SGLANG
from saw_sglang.version_guard import UnsupportedSGLangVersion, check_sglang_version


def test_entry_point_registered():
    eps = md.entry_points(group="sglang.srt.plugins")
    ours = [ep for ep in eps if ep.value.startswith("saw_sglang.")]
    assert ours, "saw_sglang plugin entry point missing"
    assert callable(ours[0].load())


def test_installed_sglang_is_supported():
    assert check_sglang_version() == md.version("sglang")


@pytest.mark.parametrize("bad", ["0.5.16", "0.5.23", "0.6.0"])
def test_unsupported_version_names_the_range(bad):
    with pytest.raises(UnsupportedSGLangVersion) as e:
        check_sglang_version(bad)
    assert SUPPORTED_SGLANG in str(e.value) and bad in str(e.value)


def test_plugin_load_refuses_faked_version(monkeypatch):
    from saw_sglang import version_guard, plugin

    monkeypatch.setattr(version_guard.metadata, "version", lambda name: "0.5.23")
    with pytest.raises(UnsupportedSGLangVersion, match="0.5.23"):
        plugin.load()


@pytest.mark.parametrize(
    "module",
    [
        "sglang.srt.mem_cache.memory_pool",
        "sglang.srt.server_args",
        "sglang.srt.layers.attention.flashinfer_backend",
        "sglang.srt.layers.attention.triton_backend",
    ],
)
def test_sglang_modules_we_patch_import(module):
    importlib.import_module(module)
