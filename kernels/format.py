"""The SAW-INT4 KV format: the one place that defines shapes and bytes per token.

Per token, per KV head, per group of `group_size` channels:
  * rotation (K when `rotate_k`, V when `rotate_v`): x' = x . H_B, H_B block-diagonal,
    each block the normalised Sylvester Hadamard of size `block_size`. H_B is
    symmetric and orthogonal, so it is its own inverse, and q.k = (q H).(k H).
  * asymmetric min-max INT4: scale = (max - min) / 15, q = floor((x' - min) / scale + 0.5)
    clamped to 0..15, with scale and min stored as fp16 (the quantiser divides by
    the *stored* fp16 values so that dequantisation is exact to the code).
  * packing: within a group, byte j holds element j (low nibble) and element
    j + group_size/2 (high nibble): two contiguous half-vectors unpack with one
    shift and one mask.

Buffers per layer (SGLang pool rows = slots):
  data   uint8   [rows, heads, head_dim // 2]
  scales float16 [rows, heads, head_dim // group_size, 2]   (scale, min)
Data and scales are separate contiguous tensors so SGLang's slot-move machinery
(which assumes row stride = prod(shape[1:])) copies both correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Non-finite inputs are mapped into [-CLAMP, CLAMP] before and after rotation so that
# max - min <= 2*CLAMP and scale = (max - min) / 15 stays finite in fp16 (max 65504).
CLAMP = 30000.0
ROTATIONS = ("hadamard", "none")
SCALE_FITS = ("minmax", "lsq")


def group_examples(head_dim: int, candidates) -> str:
    """The distinct valid group sizes among `candidates` (even divisors of head_dim),
    largest first, as "a, b or c": suggestions that never repeat themselves."""
    ok = sorted({g for g in candidates if g >= 2 and g % 2 == 0 and head_dim % g == 0}, reverse=True)
    ok = [str(g) for g in ok] or [str(head_dim)]
    return ok[0] if len(ok) == 1 else ", ".join(ok[:-1]) + " or " + ok[-1]


@dataclass(frozen=True)
class Int4KVFormat:
    head_dim: int
    group_size: int | None = None  # None -> head_dim
    rotation: str = "hadamard"  # "hadamard" | "none"
    block_size: int | None = None  # None -> min(128, head_dim)
    rotate_k: bool = True  # K is rotated whenever rotation is on
    rotate_v: bool = False
    scale_fit: str = "minmax"  # how the writer picks (scale, min); readers never look

    def __post_init__(self):
        if self.group_size is None:
            object.__setattr__(self, "group_size", self.head_dim)
        if self.block_size is None:
            object.__setattr__(self, "block_size", min(128, self.head_dim))
        self.validate()

    def validate(self) -> None:
        d, g, b = self.head_dim, self.group_size, self.block_size
        if d <= 0 or d % 2:
            raise ValueError(f"head_dim must be a positive even number, got {d}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.scale_fit not in SCALE_FITS:
            raise ValueError(f"scale fit must be one of {SCALE_FITS}, got {self.scale_fit!r}")
        if g < 2 or g % 2 or d % g:
            raise ValueError(
                f"group size {g} must be an even divisor of head_dim {d} "
                f"(e.g. {group_examples(d, (d, d // 2, 32))})"
            )
        if b < 1 or b & (b - 1) or d % b:
            raise ValueError(
                f"Hadamard block size {b} must be a power of two dividing head_dim {d} "
                f"(e.g. {min(128, d)})"
            )

    # -- rotation -----------------------------------------------------------------
    @property
    def k_rotated(self) -> bool:
        return self.rotation == "hadamard" and self.rotate_k

    @property
    def v_rotated(self) -> bool:
        return self.rotation == "hadamard" and self.rotate_v

    # -- sizes ----------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.head_dim // self.group_size

    @property
    def data_bytes_per_head(self) -> int:
        return self.head_dim // 2

    @property
    def scale_bytes_per_head(self) -> int:
        return self.num_groups * 2 * 2  # fp16 scale + fp16 min per group

    @property
    def bytes_per_token_head(self) -> int:
        """Bytes of one tensor (K or V) for one token and one KV head."""
        return self.data_bytes_per_head + self.scale_bytes_per_head

    def bytes_per_token(self, num_kv_heads: int, num_layers: int) -> int:
        """K + V bytes of one token across all layers."""
        return 2 * num_layers * num_kv_heads * self.bytes_per_token_head

    def compression_vs(self, elem_bytes: int = 2) -> float:
        """How many times smaller than a cache of `elem_bytes`-wide elements (BF16 = 2)."""
        return self.head_dim * elem_bytes / self.bytes_per_token_head

    def data_shape(self, rows: int, heads: int) -> tuple[int, int, int]:
        return (rows, heads, self.head_dim // 2)

    def scale_shape(self, rows: int, heads: int) -> tuple[int, int, int, int]:
        return (rows, heads, self.num_groups, 2)

    def alloc(self, rows: int, heads: int, device="cpu"):
        """(data, scales) for one tensor of one layer, zero-filled."""
        data = torch.zeros(self.data_shape(rows, heads), dtype=torch.uint8, device=device)
        scales = torch.zeros(self.scale_shape(rows, heads), dtype=torch.float16, device=device)
        return data, scales

    def describe(self) -> str:
        rot = "none"
        if self.rotation == "hadamard":
            rot = f"hadamard B={self.block_size} ({'K+V' if self.rotate_v else 'K'})"
        return (
            f"saw-int4 (group {self.group_size}, rotation {rot}, fp16 scale+min; "
            f"{self.bytes_per_token_head} B per token-head vs {2 * self.head_dim} B BF16, "
            f"{self.compression_vs():.2f}x smaller)"
        )


# The formats the INT4 attention kernels read, and so the ones a server runs: the one
# statement of it, which the decode and prefix kernels, the startup refusals and the
# flag checks all ask (served_problem). Any Int4KVFormat is a valid format (the accuracy
# tool simulates others); the kernels' tiles take these head dims, the prefix kernel
# groups of at least MIN_SERVED_GROUP channels (which also keeps a scale row no longer
# than a data row, as SGLang's slot moves need).
SERVED_HEAD_DIMS = (64, 128, 256)
MIN_SERVED_GROUP = 32


def served_problem(fmt: Int4KVFormat) -> str | None:
    """Why the INT4 attention kernels cannot read `fmt`, in one line; None when they can."""
    if fmt.head_dim in SERVED_HEAD_DIMS and fmt.group_size >= MIN_SERVED_GROUP:
        return None
    dims = "/".join(map(str, SERVED_HEAD_DIMS))
    return (f"the INT4 attention kernels read head_dim {dims} with groups of at least "
            f"{MIN_SERVED_GROUP} channels (got head_dim {fmt.head_dim}, group size {fmt.group_size})")


def hadamard(block_size: int, dtype=torch.float32, device="cpu", normalized=True) -> torch.Tensor:
    """Sylvester Hadamard matrix of size `block_size` (a power of two)."""
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {block_size}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block_size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if normalized:
        h = h / block_size**0.5
    return h.to(dtype=dtype, device=device)


def block_hadamard(head_dim: int, block_size: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The full [head_dim, head_dim] block-diagonal normalised Hadamard H_B."""
    h = hadamard(block_size, torch.float64)
    return torch.block_diag(*([h] * (head_dim // block_size))).to(dtype=dtype, device=device)
