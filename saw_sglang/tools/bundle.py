"""Offline bundle mechanics: slim wheels, pack them into one tar, split it into parts,
and write the install script that reassembles and installs it on the target host."""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import lzma
import os
import pathlib
import tarfile
import zipfile

MiB = 1 << 20

# Files the SGLang server never loads, by distribution. sglang_kernel's FlashAttention-3
# library alone is ~370 MB; without these the wheel imports and serves with the triton
# and flashinfer attention backends (fa3 is gone). libxgrammar.a is a static archive
# for C++ users, never loaded by Python.
SLIM_RULES: dict[str, list[str]] = {
    "sglang_kernel": [
        "sgl_kernel/flash_ops*.so",
        "sgl_kernel/flashmla_ops*.so",
        "sgl_kernel/infllm_ops*.so",
        "sgl_kernel/sm100/common_ops*.so",
    ],
    "xgrammar": ["xgrammar/lib/*.a"],
}


def sha256_file(path: pathlib.Path, chunk: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def wheel_dist(filename: str) -> str:
    """Distribution part of a wheel file name, normalised (`sglang_kernel`)."""
    return filename.split("-")[0].lower().replace(".", "_")


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def rewrite_wheel(src: pathlib.Path, dst: pathlib.Path, drop: list[str] = (),
                  stored: bool = False) -> list[str]:
    """Copy a wheel, leaving out members that match `drop` and their RECORD lines.

    stored=True writes every member uncompressed (still a valid wheel: RECORD hashes
    cover contents, not the zip encoding), so that a later xz pass sees raw bytes.
    Returns the names dropped."""
    dropped: list[str] = []
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        dropped = [n for n in names if any(fnmatch.fnmatch(n, p) for p in drop)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        tmp = dst.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", compression=method) as zout:
            for info in zin.infolist():
                if info.filename in dropped:
                    continue
                data = zin.read(info)
                if info.filename == record and dropped:
                    data = fix_record(data.decode(), dropped).encode()
                out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                out.external_attr = info.external_attr
                out.compress_type = method
                zout.writestr(out, data)
        os.replace(tmp, dst)
    return dropped


def fix_record(record: str, dropped: list[str]) -> str:
    """RECORD without the lines of dropped files (pip checks nothing else here)."""
    gone = set(dropped)
    keep = [ln for ln in record.splitlines() if ln and ln.split(",")[0] not in gone]
    return "\n".join(keep) + "\n"


def verify_wheel(path: pathlib.Path) -> None:
    """Every member is listed in RECORD with a matching hash, and vice versa."""
    with zipfile.ZipFile(path) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        rows = {ln.split(",")[0]: ln.split(",")[1]
                for ln in z.read(record).decode().splitlines() if ln}
        members = {n for n in z.namelist() if not n.endswith("/")}
        if set(rows) != members:
            raise ValueError(f"{path.name}: RECORD lists {sorted(set(rows) ^ members)[:5]}")
        for name, h in rows.items():
            if h and _record_hash(z.read(name)) != h:
                raise ValueError(f"{path.name}: hash mismatch for {name}")


def xz_wheel(wheel: pathlib.Path, cache: pathlib.Path, preset: int = 6) -> pathlib.Path:
    """NAME.whl.xz: xz over an uncompressed (stored) copy of the wheel, cached by the
    wheel's hash so that rebuilds only compress what changed."""
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{sha256_file(wheel)[:20]}-{wheel.name}.xz"
    if not out.exists():
        stored = cache / (wheel.name + ".stored")
        rewrite_wheel(wheel, stored, stored=True)
        with open(stored, "rb") as src, lzma.open(out.with_suffix(".tmp"), "wb",
                                                   preset=preset) as dst:
            while block := src.read(4 * MiB):
                dst.write(block)
        stored.unlink()
        os.replace(out.with_suffix(".tmp"), out)
    return out


def unxz_wheel(path: pathlib.Path) -> pathlib.Path:
    """Inverse of xz_wheel (the result is the stored wheel, which pip installs as is)."""
    out = path.with_suffix("")
    with lzma.open(path) as src, open(out, "wb") as dst:
        while block := src.read(4 * MiB):
            dst.write(block)
    return out


def pack(files: list[pathlib.Path], out: pathlib.Path) -> None:
    """One plain tar of the files under wheels/ (entries sorted, owner and time zeroed)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for w in sorted(files, key=lambda p: p.name):
            info = tar.gettarinfo(str(w), arcname=f"wheels/{w.name}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(w, "rb") as f:
                tar.addfile(info, f)


def split(path: pathlib.Path, part_mib: float, out_dir: pathlib.Path,
          balanced: bool = True) -> list[pathlib.Path]:
    """Cut a file into parts of at most part_mib MiB: NAME.part01, NAME.part02, ...

    balanced: as few parts as the limit allows, of (nearly) equal size, so that every
    transfer keeps the same headroom under the limit."""
    limit = int(part_mib * MiB)
    if limit <= 0:
        raise ValueError("part size must be positive")
    size = path.stat().st_size
    if balanced and size:
        count = -(-size // limit)
        limit = -(-size // count)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(path.name + ".part*"):
        old.unlink()
    parts = []
    with open(path, "rb") as f:
        while block := f.read(limit):
            p = out_dir / f"{path.name}.part{len(parts) + 1:02d}"
            p.write_bytes(block)
            parts.append(p)
    return parts


def write_manifest(out_dir: pathlib.Path, bundle: pathlib.Path, parts: list[pathlib.Path],
                   wheels: list[dict], extra: dict) -> dict:
    manifest = {
        "bundle": bundle.name,
        "bundle_sha256": sha256_file(bundle),
        "bundle_bytes": bundle.stat().st_size,
        "parts": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                  for p in parts],
        "wheels": wheels,
        **extra,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    sums = [f"{p['sha256']}  {p['name']}" for p in manifest["parts"]]
    (out_dir / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return manifest


def write_install_script(out_dir: pathlib.Path, manifest: dict) -> pathlib.Path:
    text = INSTALL_SH.replace("@BUNDLE@", manifest["bundle"]).replace(
        "@SHA@", manifest["bundle_sha256"])
    path = out_dir / "install.sh"
    path.write_text(text)
    path.chmod(0o755)
    return path


# Runs on the target host: bash, coreutils and the host's python3 (tarfile + lzma).
INSTALL_SH = r"""#!/usr/bin/env bash
# Reassemble the offline bundle from the parts beside this script (or in PARTS_DIR),
# check it, and install its wheels into TARGET with pip, without any index.
# usage: install.sh [TARGET]     (default /tmp/site; PYTHON=python3)
# Idempotent: a stamp in TARGET marks the bundle as installed. A saw_sglang wheel
# beside the parts is (re)installed every time, so code updates land.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PARTS_DIR="${PARTS_DIR:-$HERE}"
TARGET="${1:-/tmp/site}"
PY="${PYTHON:-python3}"
BUNDLE="@BUNDLE@"
BUNDLE_SHA="@SHA@"
STAMP="$TARGET/.saw-bundle-$BUNDLE_SHA"
PIP=("$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check -q)

mkdir -p "$TARGET"
if [ -f "$STAMP" ]; then
  echo "bundle $BUNDLE already installed in $TARGET"
else
  cd "$PARTS_DIR"
  missing=0
  while read -r sum name; do
    if [ ! -f "$name" ]; then echo "missing part: $name"; missing=1; continue; fi
    echo "$sum  $name" | sha256sum -c --quiet - || { echo "bad checksum: $name"; exit 2; }
  done < SHA256SUMS
  [ "$missing" = 0 ] || { echo "copy the missing parts into $PARTS_DIR first"; exit 3; }
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/saw-bundle.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
  cat $(awk '{print $2}' SHA256SUMS) > "$WORK/$BUNDLE"
  echo "$BUNDLE_SHA  $WORK/$BUNDLE" | sha256sum -c --quiet - || { echo "reassembled bundle is corrupt"; exit 2; }
  # Unpack; wheels stored as NAME.whl.xz (xz over an uncompressed wheel) are expanded.
  "$PY" - "$WORK/$BUNDLE" "$WORK/x" <<'PYEOF'
import lzma, pathlib, shutil, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    if hasattr(tarfile, "data_filter"):
        t.extractall(sys.argv[2], filter="data")
    else:
        t.extractall(sys.argv[2])
for xz in pathlib.Path(sys.argv[2], "wheels").glob("*.whl.xz"):
    with lzma.open(xz) as src, open(xz.with_suffix(""), "wb") as dst:
        shutil.copyfileobj(src, dst, 4 << 20)
    xz.unlink()
PYEOF
  rm -f "$WORK/$BUNDLE"
  "${PIP[@]}" --target "$TARGET" "$WORK"/x/wheels/*.whl
  rm -f "$TARGET"/.saw-bundle-*
  touch "$STAMP"
  echo "installed $(ls "$WORK"/x/wheels | wc -l) wheels into $TARGET"
fi
shopt -s nullglob
self=("$PARTS_DIR"/saw_sglang-*.whl)
if [ ${#self[@]} -gt 0 ]; then
  "${PIP[@]}" --upgrade --target "$TARGET" "${self[@]}"
  echo "installed ${self[*]##*/} into $TARGET"
fi
"""
