"""The package installs as saw_sglang with kernels/ and patches/ inside its namespace."""

import importlib
import importlib.metadata as md
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

from saw_sglang.tools.wheelhouse import NOT_SOURCE

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_namespace_imports_resolve_to_repo_folders():
    kernels = importlib.import_module("saw_sglang.kernels")
    patches = importlib.import_module("saw_sglang.patches")
    assert pathlib.Path(kernels.__file__).parent == ROOT / "kernels"
    assert pathlib.Path(patches.__file__).parent == ROOT / "patches"


def test_no_top_level_kernels_package_shipped():
    dist = md.distribution("saw-sglang")
    top = (dist.read_text("top_level.txt") or "").split()
    assert "kernels" not in top and "patches" not in top



def test_installed_copy_does_not_expose_top_level_kernels(tmp_path):
    """`import kernels` is never ours where the repository root is not on sys.path (SGLang's
    `kernels` dependency must not be shadowed). The same probe run from the root, where
    Python puts the cwd on sys.path, does find our folder: the probe can see it, and that
    is why the GPU-host drivers set PYTHONSAFEPATH."""
    code = (
        "import importlib.util, saw_sglang.kernels as k, saw_sglang.patches as p;"
        "s = importlib.util.find_spec('kernels'); print(s.origin if s else None)"
    )
    ours = str(ROOT / "kernels" / "__init__.py")

    def origin(cwd, **env):
        return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                              check=True, env={**os.environ, **env}).stdout.strip()

    assert origin(ROOT) == ours
    assert origin(ROOT, PYTHONSAFEPATH="1") != ours
    assert origin(tmp_path) != ours


def test_every_subpackage_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for pkg, folder in cfg["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((pkg, *rel)))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_built_wheel_has_namespace_layout(tmp_path):
    """A non-editable build puts kernels/ and patches/ under saw_sglang/. Built from a copy
    of the source: an in-tree build reuses build/lib, where files deleted since linger."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(src)],
        capture_output=True, text=True,
    )
    if out.returncode != 0 and "No module named" in out.stderr and "setuptools" in out.stderr:
        pytest.skip("setuptools not importable in this interpreter")
    assert out.returncode == 0, out.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("saw_sglang-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "saw_sglang/kernels/__init__.py" in names
    assert "saw_sglang/patches/__init__.py" in names
    assert not any(n.startswith(("kernels/", "patches/")) for n in names)
    # lab tooling and this project's own GPU host list stay out of what users install
    assert not any(n.startswith(("dev/", "tests/")) or "h200" in n for n in names)
    assert "saw_sglang/tools/sets/sglang-0.5.17.txt" in names
