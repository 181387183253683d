"""KV-cache modes: one spelling for the accuracy tool, `bench serve` and the server.

A mode is `bf16`, `fp8` or `int4[:OPTION]...`. Every server option of int4 is a
`--saw-*` flag without its prefix, so a mode reads as its flags:

    int4                                  --kv-cache-dtype int4
    int4:rotation=none                    --kv-cache-dtype int4 --saw-rotation none
    int4:rotate-v:group-size=32           ... --saw-rotate-v --saw-group-size 32
    int4:calibration=FILE                 ... --saw-calibration FILE
    int4:calibration=auto                 ... --saw-calibration auto (made once per model)

Simulation-only options (the accuracy tool; no server has them) measure levers the
kernels do not implement: `bf16-layers=0+1` (those layers stay BF16; `a-b` is a
range), `sink-tokens=N` (each sequence's first N tokens stay BF16), `q8` (queries
rounded to int8, the price of an INT8 q.k kernel), `calibration-parts=mean|scale`
(use only one half of a K calibration). No torch import here: bench serve reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from saw_sglang.config import SawConfig
from saw_sglang.kernels.format import ROTATIONS, SCALE_FITS

KINDS = ("bf16", "fp8", "int4")
# SGLang's --kv-cache-dtype for each kind, and who serves it.
KV_CACHE_DTYPE = {"bf16": "bf16", "fp8": "fp8_e4m3", "int4": "int4"}
STOCK_KINDS = ("bf16", "fp8")
ALIASES = {"fp8_e4m3": "fp8"}  # SGLang's own name for the same cache
OLD_NAMES = {"saw-int4": "int4", "int4-naive": "int4:rotation=none"}
SIM_OPTIONS = ("bf16-layers", "sink-tokens", "q8", "calibration-parts")
CALIBRATION_PARTS = ("mean", "scale", "mean+scale")  # of a calibration holding both
# The valid int4 options on one line, for the error that names an unknown one.
OPTIONS = (f"rotation={'|'.join(ROTATIONS)}, hadamard-block-size=N, group-size=N, rotate-v | no-rotate-v, "
           f"scale-fit={'|'.join(SCALE_FITS)}, calibration=FILE|auto; simulation only: bf16-layers=0+1, "
           f"sink-tokens=N, q8, calibration-parts={'|'.join(CALIBRATION_PARTS)}")
# Spellings of earlier releases -> the one spelling now (named in the error).
RENAMED = {"rot": "rotation", "b": "hadamard-block-size", "g": "group-size", "v": "rotate-v",
           "keep": "bf16-layers"}

GRAMMAR = """\
Modes (comma-separated): bf16 | fp8 | int4[:OPTION]...
  bf16, fp8              stock SGLang caches (--kv-cache-dtype bf16 / fp8_e4m3)
  int4                   SAW-INT4 with the server's defaults (--kv-cache-dtype int4)
int4 options = the server's --saw-* flags without the prefix (one spelling everywhere):
  rotation=hadamard|none   hadamard-block-size=N   group-size=N   rotate-v | no-rotate-v
  scale-fit=minmax|lsq     (default: lsq with a calibration, minmax without)
  calibration=FILE|auto    a K calibration (python -m saw_sglang.calibrate); auto: made
                           once per model (the server at startup, the accuracy tool here)
simulation only (accuracy tool):
  bf16-layers=0+1 (layers 0 and 1 stay BF16; 0-3 is a range)   sink-tokens=N (first N
  tokens stay BF16)   q8 (int8 queries)   calibration-parts=mean|scale|mean+scale (which
  part of the calibration; calibration=auto uses the mean alone by default)
e.g. bf16,fp8,int4:rotation=none,int4,int4:rotate-v,int4:group-size=32,int4:bf16-layers=0+1"""


@dataclass(frozen=True)
class ModeSpec:
    kind: str
    saw: tuple = ()  # ((SawConfig field, value), ...) in SawConfig's order
    sim: tuple = ()  # ((option, value), ...) simulation only
    text: str = field(default="", compare=False)

    @property
    def config(self) -> SawConfig:
        return SawConfig(**dict(self.saw))

    @property
    def sim_options(self) -> dict:
        return dict(self.sim)

    @property
    def servable(self) -> bool:
        """A server can run it (no simulation-only option; `calibration=auto` a server
        makes itself: --saw-calibration auto)."""
        return not self.sim

    def server_args(self) -> list[str]:
        """SGLang / saw_sglang.launch_server flags for this mode."""
        if not self.servable:
            raise ValueError(f"mode {self.text!r} is simulation-only (options "
                             f"{', '.join(k for k, _ in self.sim)}); a server "
                             "runs bf16, fp8 or int4 with --saw-* options")
        out = ["--kv-cache-dtype", KV_CACHE_DTYPE[self.kind]]
        for name, value in self.saw:
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + flag[2:])
            else:
                out += [flag, str(value)]
        return out

    @property
    def stock(self) -> bool:
        return self.kind in STOCK_KINDS


def _saw_fields() -> dict:
    return {f.name[len("saw_"):].replace("_", "-"): f for f in fields(SawConfig)}


def _layers(val: str, spec: str) -> tuple[int, ...]:
    out = []
    for part in val.split("+"):
        a, dash, b = part.partition("-")
        try:
            lo, hi = int(a), int(b) if dash else int(a)
        except ValueError:
            raise ValueError(f"mode {spec!r}: bf16-layers takes layer numbers joined by '+' and "
                             f"ranges a-b, e.g. bf16-layers=0+1 or bf16-layers=0-3, got {val!r}") from None
        out += range(lo, hi + 1)
    return tuple(sorted(set(out)))


def parse(spec: str) -> ModeSpec:
    """A mode string -> ModeSpec; ValueError naming the fix on bad input."""
    text = spec.strip()
    if text in OLD_NAMES:
        raise ValueError(f"mode {text!r} is now spelled {OLD_NAMES[text]!r}")
    kind, *opts = text.split(":")
    kind = ALIASES.get(kind, kind)
    text = ":".join([kind, *opts])
    if kind not in KINDS:
        raise ValueError(f"unknown KV mode {kind!r} in {spec!r}: use bf16, fp8 or int4[:options]")
    if opts and kind != "int4":
        raise ValueError(f"mode {spec!r}: only int4 takes options (bf16 and fp8 are stock caches)")
    known = _saw_fields()
    saw, sim = {}, {}
    for opt in opts:
        key, eq, val = opt.partition("=")
        if key in RENAMED:
            raise ValueError(f"mode {spec!r}: option {key!r} is now spelled {RENAMED[key]!r} "
                             f"(e.g. int4:{RENAMED[key]}{'' if key == 'v' else '=...'})")
        if key in known or (key.startswith("no-") and key[3:] in known):
            name = key[3:] if key.startswith("no-") else key
            f = known[name]
            if f.type in (bool, "bool"):
                if eq:
                    raise ValueError(f"mode {spec!r}: {name} is a switch: write {name} or no-{name}")
                saw[f.name] = not key.startswith("no-")
            elif key.startswith("no-") or not val:
                raise ValueError(f"mode {spec!r}: {name} needs a value, e.g. {name}=...")
            elif "int" in str(f.type):
                if not val.isdigit():
                    raise ValueError(f"mode {spec!r}: {name} takes a positive integer, got {val!r}")
                saw[f.name] = int(val)
            else:
                saw[f.name] = val
        elif key == "bf16-layers" and val:
            sim[key] = _layers(val, spec)
        elif key == "sink-tokens" and val.isdigit():
            sim[key] = int(val)
        elif key == "q8" and not eq:
            sim[key] = True
        elif key == "calibration-parts" and val in CALIBRATION_PARTS:
            sim[key] = val
        else:
            raise ValueError(f"mode {spec!r}: unknown or malformed option {opt!r}; int4 takes {OPTIONS}")
    if "calibration-parts" in sim and "saw_calibration" not in saw:
        raise ValueError(f"mode {spec!r}: calibration-parts needs calibration=FILE|auto too")
    order = [f.name for f in fields(SawConfig)]
    return ModeSpec(kind, tuple(sorted(saw.items(), key=lambda kv: order.index(kv[0]))),
                    tuple(sorted(sim.items())), text)


def parse_list(specs: str) -> list[ModeSpec]:
    out = [parse(s) for s in specs.split(",") if s.strip()]
    if not out:
        raise ValueError("no modes given: e.g. --modes bf16,int4")
    return out
