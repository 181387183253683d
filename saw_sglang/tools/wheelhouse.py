"""Build an offline bundle of wheels for a GPU host without network.

    python -m saw_sglang.tools.wheelhouse --out wheelhouse [--carry .gpu-carry]
    python -m saw_sglang.tools.wheelhouse --out wheelhouse --only-self

Resolves the bundle list (SGLang 0.5.17's server path, FlashInfer, model weights)
against the host's frozen package list, downloads the missing wheels for the host's
Python and platform, slims the large ones, packs them into one tar (xz when that
saves over 10%), splits it into parts of at most --part-mib MiB, and writes
manifest.json, SHA256SUMS and install.sh beside the parts. Our own wheel is a
separate small file, so that it can be rebuilt alone (--only-self).

Needs a python3 with pip, and `packaging` and `tqdm` (checked first, with the command
that installs them); runs from a checkout without installing anything else. Our wheel
is built with the interpreter's own setuptools when it can build wheels (70.1 or
later, or `wheel` installed), otherwise in pip's isolated build environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import email.parser
import importlib.metadata
import importlib.util
import json
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

from saw_sglang.cli import Parser, fail
from saw_sglang.tools import bundle as B

PROG = "python -m saw_sglang.tools.wheelhouse"
NEEDS = ("packaging", "tqdm")  # imported where used: --help, --dry-run, --only-self go without

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_HOST = HERE / "hosts" / "h200.txt"
DEFAULT_SET = HERE / "sets" / "sglang-0.5.17.txt"
DEFAULT_PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                     "manylinux_2_26_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                     "manylinux2014_x86_64"]
BUNDLE_STEM = "saw-bundle.tar"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclasses.dataclass
class Req:
    name: str
    version: str
    flags: frozenset[str] = frozenset()

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


def read_host(path: pathlib.Path) -> dict[str, str | None]:
    """Host list: NAME or NAME==VERSION per line -> {normalised name: version or None}."""
    host: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            host[norm(name)] = ver.strip() or None
    return host


def read_set(path: pathlib.Path) -> list[Req]:
    reqs = []
    for line in path.read_text().splitlines():
        fields = line.split("#")[0].split()
        if fields:
            name, _, ver = fields[0].partition("==")
            if not ver:
                raise ValueError(f"{path.name}: pin every wheel exactly: {fields[0]}")
            reqs.append(Req(name, ver, frozenset(fields[1:])))
    return reqs


def plan(reqs: list[Req], host: dict[str, str | None], with_kernel: bool = True,
         with_models: bool = True) -> tuple[list[Req], list[tuple[Req, str]]]:
    """Split the bundle list into (to fetch, [(skipped, why)])."""
    fetch, skipped = [], []
    for r in reqs:
        have = host.get(norm(r.name), "absent")
        if "kernel" in r.flags and not with_kernel:
            skipped.append((r, "left out (--no-sgl-kernel)"))
        elif "model" in r.flags and not with_models:
            skipped.append((r, "left out (--no-models)"))
        elif have != "absent" and "override" not in r.flags:
            skipped.append((r, f"host has {r.name}" + (f" {have}" if have else "")))
        else:
            fetch.append(r)
    return fetch, skipped


def download(reqs: list[Req], dest: pathlib.Path, python: str, platforms: list[str]) -> None:
    """pip download of exact pins, binary only, for the target interpreter; reuses files
    already in dest."""
    dest.mkdir(parents=True, exist_ok=True)
    have = {(norm(w.name.split("-")[0]), w.name.split("-")[1]) for w in dest.glob("*.whl")}
    todo = [r for r in reqs if (norm(r.name), r.version) not in have]
    if not todo:
        return
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp",
           "--abi", f"cp{python.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
    for p in platforms:
        cmd += ["--platform", p]
    cmd += ["-d", str(dest), *[r.pin for r in todo]]
    print(f"downloading {len(todo)} wheels ...", flush=True)
    subprocess.run(cmd, check=True)


def find_wheel(dest: pathlib.Path, r: Req) -> pathlib.Path:
    hits = [w for w in dest.glob("*.whl")
            if norm(w.name.split("-")[0]) == norm(r.name) and w.name.split("-")[1] == r.version]
    if len(hits) != 1:
        raise FileNotFoundError(f"expected one wheel for {r.pin} in {dest}, found {hits}")
    return hits[0]


def missing_needs(bundle: bool) -> str | None:
    """What this interpreter lacks (pip; for a bundle also NEEDS), as the one line that
    says how to fix it."""
    python = sys.executable or "python3"
    if importlib.util.find_spec("pip") is None:
        return (f"{python} has no pip: run `{python} -m ensurepip --upgrade` (or install "
                "your system's python3-pip package)")
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None] if bundle else []
    if missing:
        return (f"the bundle build needs {', '.join(missing)}: run "
                f"`{python} -m pip install {' '.join(missing)}`")
    return None


def _version(dist: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in re.findall(r"\d+", importlib.metadata.version(dist))[:2])
    except importlib.metadata.PackageNotFoundError:
        return ()


def build_isolation_args() -> list[str]:
    """Build with this interpreter's setuptools when it can make wheels (bdist_wheel is
    in setuptools since 70.1, in `wheel` before); otherwise pip's isolated build, which
    fetches setuptools from the index this tool downloads from anyway."""
    st = _version("setuptools")
    if st >= (70, 1) or (st >= (64,) and _version("wheel")):
        return ["--no-build-isolation"]
    return []


def unmet_requirements(wheels: list[pathlib.Path], host: dict, python: str) -> dict[str, list[str]]:
    """Declared (non-extra) requirements that neither the bundle nor the host provides.
    Informational: SGLang declares many that its server path never imports."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment()
    env.update(python_version=python, python_full_version=python + ".0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", extra="")
    provided = set(host) | {norm(w.name.split("-")[0]) for w in wheels}
    unmet: dict[str, list[str]] = {}
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            msg = email.parser.Parser().parsestr(z.read(meta).decode())
        for line in msg.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate(env):
                continue
            if norm(req.name) not in provided:
                unmet.setdefault(norm(req.name), []).append(norm(w.name.split("-")[0]))
    return unmet


def build_self(out_dir: pathlib.Path) -> pathlib.Path:
    """Our own wheel, built from the source tree (pure Python)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("saw_sglang-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *build_isolation_args(),
                    "-q", "-w", str(out_dir), str(ROOT)], check=True)
    (wheel,) = out_dir.glob("saw_sglang-*.whl")
    return wheel


def prepare(wheels: list[pathlib.Path], reqs: dict[str, Req], work: pathlib.Path) -> list[dict]:
    """Copy each wheel into work/, slimmed where its bundle-list entry says `slim`;
    returns the wheel table."""
    work.mkdir(parents=True, exist_ok=True)
    for old in [*work.glob("*.whl"), *work.glob("*.whl.xz")]:
        old.unlink()
    table = []
    for w in wheels:
        dist = B.wheel_dist(w.name)
        drop = B.SLIM_RULES.get(dist, []) if "slim" in reqs[dist].flags else []
        out = work / w.name
        dropped = B.rewrite_wheel(w, out, drop) if drop else []
        if drop:
            B.verify_wheel(out)
        else:
            shutil.copy2(w, out)
        table.append({"wheel": w.name, "bytes": w.stat().st_size, "dropped": dropped,
                      "bundled_bytes": out.stat().st_size})
    return table


def compress(table: list[dict], wheels_dir: pathlib.Path, cache: pathlib.Path, mode: str,
             skip: set[str], min_bytes: int = 1 << 20) -> list[pathlib.Path]:
    """Per wheel: xz over its stored copy when that saves over 10% (mode auto), always
    (xz) or never (none). Small wheels and model weights (quantised, incompressible)
    stay as they are. Two processes; results are cached by wheel hash."""
    files = {row["wheel"]: wheels_dir / row["wheel"] for row in table}
    todo = [] if mode == "none" else [
        files[r["wheel"]] for r in table
        if r["bundled_bytes"] >= min_bytes and B.wheel_dist(r["wheel"]) not in skip]
    if todo:
        from concurrent.futures import ProcessPoolExecutor

        from tqdm import tqdm

        with ProcessPoolExecutor(2) as pool:
            futs = {w.name: pool.submit(B.xz_wheel, w, cache) for w in todo}
            for name in tqdm(futs, desc="xz", unit="wheel"):
                futs[name] = futs[name].result()
        for row in table:
            xz = futs.get(row["wheel"])
            if xz is not None and (mode == "xz" or xz.stat().st_size < 0.9 * row["bundled_bytes"]):
                files[row["wheel"]] = xz
    out = []
    for row in table:
        f = files[row["wheel"]]
        if f.suffix == ".xz":
            dst = wheels_dir / (row["wheel"] + ".xz")
            shutil.copy2(f, dst)
            f = dst
        row["packed_as"] = f.name
        row["packed_bytes"] = f.stat().st_size
        out.append(f)
    return out


def carry_layout(parts_dir: pathlib.Path, carry: pathlib.Path, files: list[pathlib.Path],
                 self_wheel: pathlib.Path | None) -> list[pathlib.Path]:
    """carry/partN/ = one part + manifest + SHA256SUMS + install.sh, so any one folder
    explains itself; carry/self/ = our wheel."""
    made = []
    common = [parts_dir / n for n in ("manifest.json", "SHA256SUMS", "install.sh")]
    for i, part in enumerate(files, 1):
        d = carry / f"part{i}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for f in [part, *common]:
            shutil.copy2(f, d / f.name)
        made.append(d)
    for stale in carry.glob("part*"):
        if stale not in made and stale.is_dir():
            shutil.rmtree(stale)
    if self_wheel is not None:
        d = carry / "self"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        shutil.copy2(self_wheel, d / self_wheel.name)
        made.append(d)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "wheelhouse",
                    help="work folder (download/, wheels/, parts/); default ./wheelhouse")
    ap.add_argument("--host", type=pathlib.Path, default=DEFAULT_HOST,
                    help="frozen list of the host's installed packages (default: H200 host)")
    ap.add_argument("--set", dest="set_file", type=pathlib.Path, default=DEFAULT_SET,
                    help="bundle list, NAME==VERSION [flags] per line")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--platform", action="append", dest="platforms",
                    help=f"wheel platform tag, repeatable (default: {' '.join(DEFAULT_PLATFORMS)})")
    ap.add_argument("--part-mib", type=float, default=60.0, help="largest part, MiB (default 60)")
    ap.add_argument("--compress", choices=["auto", "xz", "none"], default="auto",
                    help="xz each large wheel (over an uncompressed copy); auto keeps it only "
                         "when it saves over 10%% of that wheel (default)")
    ap.add_argument("--no-sgl-kernel", action="store_true", help="leave sglang_kernel out")
    ap.add_argument("--no-models", action="store_true", help="leave model weights out")
    ap.add_argument("--only-self", action="store_true",
                    help="rebuild only our own wheel (parts/saw_sglang-*.whl)")
    ap.add_argument("--carry", type=pathlib.Path,
                    help="also lay out carry folders here: part1/, part2/, ..., self/")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    args = ap.parse_args(argv)
    missing = missing_needs(bundle=not (args.only_self or args.dry_run))
    if missing:
        fail(PROG, missing)
    platforms = args.platforms or DEFAULT_PLATFORMS
    parts_dir = args.out / "parts"

    self_wheel = build_self(parts_dir)
    print(f"self: {self_wheel.name} ({self_wheel.stat().st_size / 1024:.0f} KiB)")
    if args.only_self:
        if args.carry:
            d = args.carry / "self"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            shutil.copy2(self_wheel, d / self_wheel.name)
            print(f"carry: {d}")
        return 0

    host = read_host(args.host)
    reqs = read_set(args.set_file)
    fetch, skipped = plan(reqs, host, not args.no_sgl_kernel, not args.no_models)
    for r, why in skipped:
        print(f"skip  {r.pin:40s} {why}")
    print(f"fetch {len(fetch)} wheels for cp{args.python_version.replace('.', '')}")
    if args.dry_run:
        for r in fetch:
            print(f"      {r.pin} {' '.join(sorted(r.flags))}")
        return 0

    dl = args.out / "download"
    download(fetch, dl, args.python_version, platforms)
    wheels = [find_wheel(dl, r) for r in fetch]
    by_dist = {B.wheel_dist(find_wheel(dl, r).name): r for r in fetch}
    unmet = unmet_requirements(wheels, host, args.python_version)

    table = prepare(wheels, by_dist, args.out / "wheels")
    files = compress(table, args.out / "wheels", args.out / "xz-cache", args.compress,
                     skip={B.wheel_dist(w.name) for w in wheels
                           if "model" in by_dist[B.wheel_dist(w.name)].flags})
    bundle_path = args.out / BUNDLE_STEM
    print(f"packing {len(files)} files ...", flush=True)
    B.pack(files, bundle_path)

    parts = B.split(bundle_path, args.part_mib, parts_dir)
    manifest = B.write_manifest(parts_dir, bundle_path, parts, table, {
        "python_version": args.python_version, "platforms": platforms,
        "host_list": args.host.name, "set": args.set_file.name,
        "skipped": [{"pin": r.pin, "why": why} for r, why in skipped],
        "unmet_declared": unmet,
        "deflated_bytes": sum(r["bundled_bytes"] for r in table),
    })
    B.write_install_script(parts_dir, manifest)
    bundle_path.unlink()  # the parts hold it
    _report(manifest, parts, table, self_wheel)
    if args.carry:
        for d in carry_layout(parts_dir, args.carry, parts, self_wheel):
            print(f"carry: {d} ({sum(f.stat().st_size for f in d.iterdir()) / B.MiB:.1f} MiB)")
    return 0


def _report(manifest: dict, parts: list[pathlib.Path], table: list[dict], self_wheel) -> None:
    mib = B.MiB
    nxz = sum(r["packed_as"].endswith(".xz") for r in table)
    print(f"\nbundle {manifest['bundle']}: {manifest['bundle_bytes'] / mib:.1f} MiB, "
          f"{len(table)} wheels ({nxz} as .whl.xz), {len(parts)} parts; the same wheels "
          f"deflated: {manifest['deflated_bytes'] / mib:.1f} MiB")
    for p in manifest["parts"]:
        print(f"  {p['name']}  {p['bytes'] / mib:6.1f} MiB  {p['sha256'][:16]}")
    print("largest wheels (MiB downloaded -> slimmed -> packed):")
    for row in sorted(table, key=lambda r: -r["bytes"])[:6]:
        note = f"  ({len(row['dropped'])} files dropped)" if row["dropped"] else ""
        print(f"  {row['wheel'][:60]:60s} {row['bytes'] / mib:7.1f} -> "
              f"{row['bundled_bytes'] / mib:6.1f} -> {row['packed_bytes'] / mib:6.1f} MiB{note}")
    if manifest["unmet_declared"]:
        print("declared but not bundled (not on the server path): "
              + ", ".join(sorted(manifest["unmet_declared"])))
    print(f"self: {self_wheel.name}")


if __name__ == "__main__":
    sys.exit(main())
