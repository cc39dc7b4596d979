"""Formula-driven pretraining data: fractal images rendered on the fly from random IFS (no download).

After "Improving Fractal Pre-training" (Anderson & Farrell, WACV 2022). A class is one iterated function system of
2-4 contractive affine maps (``sample_system``); an image is its attractor drawn by the chaos game
(``render_fractal_batch``, batched over samples on any device), posed with a small jitter and coloured light on dark.
Every pixel is a pure function of (system seed, sample seed), so runs resume exactly. How a system is drawn, why
these colours and poses, and the measurements behind the constants: docs/design.md, "Fractal renders".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from mae_et.data.folder import PretrainBatch, StepSampler
from mae_et.seeding import Family, mix64

# --- system sampling ------------------------------------------------------------------------------
MIN_MAPS, MAX_MAPS = 2, 4
S_MAX = 0.95  # largest singular value: < 1 keeps every map a contraction with some room
T_MIN = 0.2  # smallest per-map share s1 + 2 s2: a map that small only adds a dot
SIGMA_BAND = (5.0, 6.0)  # alpha = sum_i (s1_i + 2 s2_i) is drawn in [(lo + M) / 2, (hi + M) / 2]: the paper's band
PROB_FLOOR = 0.05  # every map is chosen with probability >= about this (before renormalising)

# --- degenerate-system filter ----------------------------------------------------------------------
FILTER_SIZE = 64
FILTER_POINTS = FILTER_SIZE * FILTER_SIZE  # = points_for_size(64), what a real 64x64 render uses
MIN_COVERAGE = 0.03  # the floor aimed at: a 64x64 render of an accepted system covers >= 3% of pixels
MIN_ASPECT = 0.1  # short / long side of the attractor's bounding box
MAX_ATTEMPTS = 1000

# --- rendering ------------------------------------------------------------------------------------
BURN_IN = 20  # chaos-game steps discarded per chain
MIN_POINTS, MAX_POINTS = 2048, 1 << 16
MARGIN = 0.05  # empty border, as a fraction of the canvas side, on every side
JITTER_SCALE = (0.8, 1.0)  # fitted size as a fraction of the canvas minus margins
JITTER_ROTATION = math.radians(15.0)  # small rotation (and an optional mirror) per sample
JITTER_SHIFT = 0.5  # the box slides over this central fraction of the free space (0: centred, 1: anywhere)
BACKGROUND_MAX = 0.1  # background channels in [0, BACKGROUND_MAX]: a dark, tinted background
COLOR_GAP = 0.6  # foreground channels in [BACKGROUND_MAX + COLOR_GAP, 1] = [0.7, 1]: bright, any hue
CPU_CHUNK_POINTS = 1 << 15  # points per chunk of a batch rendered on a CPU (cache-sized)

# The reference render must cover MIN_COVERAGE over the largest area shrink the jitter can apply (scale times the
# bounding box's growth under rotation): 7.0%
FILTER_COVERAGE = MIN_COVERAGE / (JITTER_SCALE[0] / (math.cos(JITTER_ROTATION) + math.sin(JITTER_ROTATION))) ** 2

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class IFSSystem:
    linear: Tensor  # (M, 2, 2) float64
    offset: Tensor  # (M, 2) float64
    probs: Tensor  # (M,) float64, sums to 1

    @property
    def num_maps(self) -> int:
        return int(self.linear.shape[0])

    def singular_values(self) -> Tensor:
        return torch.linalg.svdvals(self.linear)  # (M, 2), descending


# --- system sampling -----------------------------------------------------------------------------


def _uniform(g: torch.Generator, lo: float | Tensor, hi: float | Tensor, shape: tuple[int, ...]) -> Tensor:
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    return lo + (hi - lo) * u


def _split_budget(total: float, n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    """n random shares in [lo, hi] summing to ``total`` (needs n*lo <= total <= n*hi). Returns (n,)."""
    shares = []
    remaining = total
    for i in range(n):
        rest = n - i - 1
        # The range that still lets the remaining maps reach the budget within [lo, hi].
        a = max(lo, remaining - rest * hi)
        b = min(hi, remaining - rest * lo)
        share = b if rest == 0 else float(_uniform(g, a, b, (1,)))
        shares.append(share)
        remaining -= share
    # Drawing in sequence favours the first maps; shuffling removes the order bias.
    order = torch.randperm(n, generator=g)
    return torch.tensor(shares, dtype=torch.float64)[order]


def _rot(angle: Tensor) -> Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (..., 2, 2)


def _draw_system(seed: int) -> IFSSystem:
    """One unfiltered system; host-side (float64), drawn once per class."""
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(MIN_MAPS, MAX_MAPS + 1, (1,), generator=g))
    alpha = float(_uniform(g, (SIGMA_BAND[0] + m) / 2, (SIGMA_BAND[1] + m) / 2, (1,)))
    t = _split_budget(alpha, m, T_MIN, 3 * S_MAX, g)  # (m,) per-map s1 + 2 s2
    # s2 <= s1 = t - 2 s2  <=>  s2 <= t/3;   s1 <= S_MAX  <=>  s2 >= (t - S_MAX)/2.
    s2 = _uniform(g, (t - S_MAX).clamp(min=0.0) / 2, t / 3, (m,))  # (m,)
    s1 = t - 2 * s2  # (m,)
    theta = _uniform(g, 0.0, 2 * math.pi, (m,))
    phi = _uniform(g, 0.0, 2 * math.pi, (m,))
    reflect = torch.randint(0, 2, (m, 2), generator=g).to(torch.float64) * 2 - 1  # (m, 2) of +-1
    sigma = torch.diag_embed(torch.stack([s1, s2], -1))  # (m, 2, 2)
    linear = _rot(theta) @ sigma @ _rot(phi) @ torch.diag_embed(reflect)  # (m, 2, 2)
    offset = _uniform(g, -1.0, 1.0, (m, 2))  # (m, 2)
    det = s1 * s2  # (m,) = |det A|
    probs = (det / det.sum()).clamp(min=PROB_FLOOR)
    probs = probs / probs.sum()
    return IFSSystem(linear=linear, offset=offset, probs=probs)


def _filter_stats(system: IFSSystem, seed: int) -> tuple[float, float]:
    """(coverage of the un-jittered 64x64 reference render, bounding-box short/long ratio)."""
    keys = _stream_keys(Family.FRACTAL_FILTER, [seed], torch.device("cpu"))
    x, y, maps = _chaos_game([system], keys, FILTER_POINTS)  # (1, K) each
    if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
        return 0.0, 0.0
    extent = torch.stack([x.amax() - x.amin(), y.amax() - y.amin()])  # (2,)
    aspect = float(extent.min() / extent.max().clamp(min=1e-12))
    hist = _histogram(x, y, maps, _identity_poses(1, x.device), FILTER_SIZE)  # (1, M, S*S)
    coverage = float((hist.sum(1) > 0).float().mean())
    return coverage, aspect


@lru_cache(maxsize=1024)
def sample_system(system_seed: int) -> IFSSystem:
    """A random contractive IFS, a pure function of ``system_seed``; degenerate draws are re-drawn."""
    for attempt in range(MAX_ATTEMPTS):
        seed = mix64(Family.FRACTAL_SYSTEM, system_seed, attempt)
        system = _draw_system(seed)
        coverage, aspect = _filter_stats(system, seed)
        if coverage >= FILTER_COVERAGE and aspect >= MIN_ASPECT:
            return system
    raise RuntimeError(f"no non-degenerate IFS in {MAX_ATTEMPTS} draws from seed {system_seed}")


# --- counter-based random numbers on the device --------------------------------------------------


def _mul32(x: Tensor, c: int) -> Tensor:
    """Low 32 bits of x * c for x in [0, 2^32), computed in int64 without overflow (2 x 16-bit halves)."""
    lo = x * (c & 0xFFFF)  # < 2^48
    hi = ((x * (c >> 16)) & 0xFFFF) << 16  # only its low 16 bits reach the low 32 bits of the product
    return (lo + hi) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xorshift-multiply, 'lowbias32' constants) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _stream_keys(tag: int, seeds: list[int], device: torch.device) -> Tensor:
    """Per-sample 32-bit keys of one random stream (``tag``) from 63-bit seeds. Returns (N,) int64."""
    keys = [mix64(tag, s) & _MASK32 for s in seeds]
    return torch.tensor(keys, dtype=torch.int64, device=device)


def _hash_stream(keys: Tensor, count: int) -> Tensor:
    """``count`` random 32-bit values per key, a pure function of (key, position). Returns (N, count) int64."""
    counter = torch.arange(count, device=keys.device, dtype=torch.int64)  # (count,)
    # The golden-ratio step spreads consecutive counters over the 32-bit range before hashing.
    return _hash32((counter[None, :] * 0x9E3779B9 + keys[:, None]) & _MASK32)  # (N, count)


def _random16(keys: Tensor, count: int) -> Tensor:
    """``count`` random 16-bit ints per key. Returns (N, count) int64.

    One 32-bit hash gives two values: 16 bits resolve map probabilities to 1/65536, plenty here,
    and the hash is most of the cost of the chaos game on a CPU.
    """
    x = _hash_stream(keys, -(-count // 2))  # (N, ceil(count/2))
    return torch.cat([x >> 16, x & 0xFFFF], 1)[:, :count]  # (N, count)


def _uniforms(keys: Tensor, count: int) -> Tensor:
    """``count`` uniforms in [0, 1) per key (24 bits, exact in float32). Returns (N, count) float32."""
    return (_hash_stream(keys, count) >> 8).to(torch.float32) * (1.0 / (1 << 24))


# --- chaos game ----------------------------------------------------------------------------------


def _stack_systems(systems: list[IFSSystem], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Pad the systems to MAX_MAPS maps and move them to ``device``.

    Returns coef (N, M, 6) float32 rows (a, b, c, d, e, f) of ``x' = a x + b y + e, y' = c x + d y + f``;
    16-bit thresholds (N, M-1) int64: a random v in [0, 2^16) picks map ``sum_m (v >= thr[m])``;
    fixed points (N, M, 2) float32.
    """
    n = len(systems)
    linear = torch.zeros(n, MAX_MAPS, 2, 2, dtype=torch.float64)  # padding maps: A = 0, b = 0
    offset = torch.zeros(n, MAX_MAPS, 2, dtype=torch.float64)
    probs = torch.zeros(n, MAX_MAPS, dtype=torch.float64)
    for i, s in enumerate(systems):
        m = s.num_maps
        linear[i, :m], offset[i, :m], probs[i, :m] = s.linear, s.offset, s.probs
    coef = torch.cat([linear.view(n, MAX_MAPS, 4), offset], 2)  # (N, M, 6)
    # Fixed point x = A x + b of each map: a point of the attractor, where chains start.
    eye = torch.eye(2, dtype=torch.float64)
    fixed = torch.linalg.solve(eye - linear, offset[..., None])[..., 0]  # (N, M, 2)
    thresholds = (probs.cumsum(1)[:, :-1] * 65536).round().long()  # (N, M-1)
    # Padding maps (probability 0) get a threshold no 16-bit value reaches; so does the end of a
    # real map list, whatever the rounding of its cumulative sum.
    for i, s in enumerate(systems):
        thresholds[i, s.num_maps - 1 :] = 65536
    to = dict(device=device, dtype=torch.float32)
    return coef.to(**to), thresholds.to(device), fixed.to(**to)


def _chain_length(num_points: int) -> int:
    """Recorded steps per chain. Fewer, longer chains cost more sequential steps (per-op overhead);
    more, shorter ones spend a larger share of the work on burn-in. About sqrt(K)/8 balances the
    two on a CPU core (measured); 8 steps at 64x64, 28 at 224x224."""
    return max(1, min(num_points, 48, max(4, round(math.sqrt(num_points) / 8))))


def _chaos_game(systems: list[IFSSystem], keys: Tensor, num_points: int) -> tuple[Tensor, Tensor, Tensor]:
    """All samples' chains in lock-step. Returns x (N, K), y (N, K) float32 and producing maps (N, K) int64."""
    device = keys.device
    n = len(systems)
    coef, thresholds, fixed = _stack_systems(systems, device)
    steps = _chain_length(num_points)
    chains = -(-num_points // steps)  # ceil
    total = 1 + BURN_IN + steps  # step 0 only picks each chain's starting fixed point

    v = _random16(keys, total * chains)  # (N, T*P)
    # Map choice by inverse CDF on 16-bit values (M-1 <= 3 comparisons beat searchsorted on CPU).
    idx = torch.zeros_like(v)
    for m in range(MAX_MAPS - 1):
        idx += v >= thresholds[:, m : m + 1]
    idx = idx.view(n, total, chains)  # (N, T, P)
    rows = idx + (torch.arange(n, device=device) * MAX_MAPS)[:, None, None]  # row in the (N*M) tables
    rows = rows.transpose(0, 1).reshape(total, n * chains)  # (T, N*P): one contiguous slab per step
    table = coef.view(n * MAX_MAPS, 6).t().contiguous()  # (6, N*M): index_select gives contiguous rows

    start = fixed.view(n * MAX_MAPS, 2).t().contiguous().index_select(1, rows[0])  # (2, N*P)
    xs = torch.empty(total, n * chains, device=device)  # (T, N*P); row 0 = start
    ys = torch.empty_like(xs)
    xs[0], ys[0] = start[0], start[1]
    for t in range(1, total):
        a, b, c, d, e, f = table.index_select(1, rows[t])  # (N*P,) each
        x, y = xs[t - 1], ys[t - 1]
        torch.addcmul(e, a, x, out=xs[t]).addcmul_(b, y)
        torch.addcmul(f, c, x, out=ys[t]).addcmul_(d, y)
    # Recorded steps, reordered to (N, step, chain) so that each sample's points are contiguous.
    keep = slice(1 + BURN_IN, total)
    x = xs[keep].view(steps, n, chains).transpose(0, 1).reshape(n, steps * chains)[:, :num_points]
    y = ys[keep].view(steps, n, chains).transpose(0, 1).reshape(n, steps * chains)[:, :num_points]
    maps = idx[:, keep, :].reshape(n, steps * chains)[:, :num_points]  # the map applied at that step
    return x, y, maps


def render_points(system: IFSSystem, num_points: int, generator: torch.Generator) -> Tensor:
    """``num_points`` chaos-game points of ``system``'s attractor (CPU). Returns (num_points, 2) float32."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    seed = int(torch.randint(0, 1 << 62, (1,), generator=generator))
    x, y, _ = _chaos_game([system], _stream_keys(Family.FRACTAL_STREAM, [seed], torch.device("cpu")), num_points)
    return torch.stack([x[0], y[0]], -1)  # (K, 2)


def points_for_size(size: int) -> int:
    """Chaos-game points for a ``size`` x ``size`` canvas: one per pixel, within [MIN_POINTS, MAX_POINTS].

    One point per pixel fills dense attractors solidly and still shows the sparse ones' fine
    structure; the floor keeps small canvases from looking dusty, the cap bounds the cost above 256.
    """
    return max(MIN_POINTS, min(MAX_POINTS, size * size))


# --- pose, rasterisation, colour -----------------------------------------------------------------


def _identity_poses(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    rotation = torch.eye(2, device=device).expand(n, 2, 2)
    return rotation, torch.ones(n, device=device), torch.full((n, 2), 0.5, device=device)


@dataclass(frozen=True)
class _Styles:
    """Per-sample pose and colours, (N, ...) tensors on the render device."""

    rotation: Tensor  # (N, 2, 2): optional mirror times a small rotation
    scale: Tensor  # (N,) fitted size as a fraction of (1 - 2 * MARGIN)
    shift: Tensor  # (N, 2) where the box sits in the free space, each in [0, 1]
    background: Tensor  # (N, 3) in [0, 1]
    map_colors: Tensor  # (N, M, 3)
    gradient: Tensor  # (N, 2, 3) colours at low and high density
    by_map: Tensor  # (N,) 1. = colour by producing map, 0. = by density gradient


_STYLE_DRAWS = 8 + 3 + (MAX_MAPS + 2) * 3  # uniforms per sample used by _draw_styles


def _draw_styles(sample_seeds: list[int], jitter: bool, device: torch.device) -> _Styles:
    """Styles from the counter hash on the device: no per-sample host work, batch-independent."""
    n = len(sample_seeds)
    u = _uniforms(_stream_keys(Family.FRACTAL_STYLE, sample_seeds, device), _STYLE_DRAWS)  # (N, D)
    # Small jitter only: an optional mirror times a small rotation (quarter turns cost kNN points: docs/design.md).
    angle = (2 * u[:, 1] - 1) * JITTER_ROTATION  # (N,)
    cos, sin = torch.cos(angle), torch.sin(angle)
    mirror = torch.where(u[:, 2] < 0.5, -1.0, 1.0)  # (N,) -1 negates the new x: a horizontal flip
    rotation = torch.stack([torch.stack([mirror * cos, -mirror * sin], -1), torch.stack([sin, cos], -1)], -2)
    scale = JITTER_SCALE[0] + (JITTER_SCALE[1] - JITTER_SCALE[0]) * u[:, 3]  # (N,)
    shift = 0.5 + JITTER_SHIFT * (u[:, 4:6] - 0.5)  # (N, 2)
    if not jitter:
        rotation, scale, shift = _identity_poses(n, device)
    # Colours: a dark background of any tint, a bright foreground of any hue, a wide gap between (colour is nuisance
    # to the class: docs/design.md). u[:, 6] is left unused so that the other draws keep the slots every earlier
    # render used (a render is a pure function of its seed).
    by_map = (u[:, 7] < 0.5).float()  # (N,)
    background = BACKGROUND_MAX * u[:, 8:11]  # (N, 3) in [0, BACKGROUND_MAX]
    low = BACKGROUND_MAX + COLOR_GAP
    foreground = low + (1.0 - low) * u[:, 11:].view(n, MAX_MAPS + 2, 3)  # (N, M+2, 3) in [low, 1]
    return _Styles(
        rotation.contiguous(), scale, shift, background, foreground[:, :MAX_MAPS], foreground[:, MAX_MAPS:], by_map
    )


def _histogram(x: Tensor, y: Tensor, maps: Tensor, poses: tuple[Tensor, Tensor, Tensor], size: int) -> Tensor:
    """Pose, fit and scatter points into per-sample, per-map histograms.

    x, y, maps (N, K); poses = (rotation (N, 2, 2), scale (N,), shift (N, 2)). Returns point counts
    (N, M, S*S) float32 split by producing map; pixels row-major, row 0 at the top, +y up.
    """
    n = x.shape[0]
    rotation, scale, shift = poses
    r = rotation[:, :, :, None]  # (N, 2, 2, 1) broadcasts over points
    qx = r[:, 0, 0] * x + r[:, 0, 1] * y  # (N, K)
    qy = r[:, 1, 0] * x + r[:, 1, 1] * y
    lo = torch.stack([qx.amin(1), qy.amin(1)], -1)  # (N, 2)
    hi = torch.stack([qx.amax(1), qy.amax(1)], -1)
    extent = hi - lo  # (N, 2)
    box = (1.0 - 2 * MARGIN) * scale  # (N,) side of the square the long side is fitted to
    fit = box / extent.amax(1).clamp(min=1e-12)  # (N,)
    used = extent * fit[:, None]  # (N, 2) <= box
    origin = MARGIN + shift * (1.0 - 2 * MARGIN - used)  # (N, 2): slides within the free space
    # Canvas coordinates in [MARGIN, 1 - MARGIN], then pixel columns and rows (row 0 at the top).
    col = ((qx - lo[:, 0:1]) * fit[:, None] + origin[:, 0:1]).mul_(size).long().clamp_(0, size - 1)  # (N, K)
    row = ((qy - lo[:, 1:2]) * fit[:, None] + origin[:, 1:2]).mul_(size).long().clamp_(0, size - 1)
    sample = torch.arange(n, device=x.device)[:, None]  # (N, 1)
    bins = ((sample * MAX_MAPS + maps) * size + (size - 1 - row)) * size + col  # (N, K)
    hist = torch.zeros(n * MAX_MAPS * size * size, device=x.device)
    hist.index_add_(0, bins.view(-1), torch.ones(bins.numel(), device=x.device))
    return hist.view(n, MAX_MAPS, size * size)


def _render(systems: list[IFSSystem], sample_seeds: list[int], size: int, device: torch.device, jitter: bool) -> Tensor:
    if len(systems) != len(sample_seeds):
        raise ValueError(f"{len(systems)} systems but {len(sample_seeds)} sample seeds")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not systems:
        return torch.empty(0, 3, size, size, dtype=torch.uint8, device=device)
    sample_seeds = [int(seed) for seed in sample_seeds]
    if device.type != "cpu":
        return _render_chunk(systems, sample_seeds, size, device, jitter)
    # On a CPU the chaos game's int64 hashing is memory-bound: chunks that stay in cache are about
    # 3x faster than one big batch. Samples are independent, so chunking changes no pixel.
    chunk = max(1, CPU_CHUNK_POINTS // points_for_size(size))
    parts = [
        _render_chunk(systems[i : i + chunk], sample_seeds[i : i + chunk], size, device, jitter)
        for i in range(0, len(systems), chunk)
    ]
    return torch.cat(parts)


def _render_chunk(
    systems: list[IFSSystem], sample_seeds: list[int], size: int, device: torch.device, jitter: bool
) -> Tensor:
    n = len(systems)
    st = _draw_styles(sample_seeds, jitter, device)
    keys = _stream_keys(Family.FRACTAL_STREAM, sample_seeds, device)
    x, y, maps = _chaos_game(systems, keys, points_for_size(size))  # (N, K) each
    hist = _histogram(x, y, maps, (st.rotation, st.scale, st.shift), size)  # (N, M, S*S)
    map_colors, gradient, background, by_map = st.map_colors, st.gradient, st.background, st.by_map

    # Per-pixel point count and sum of producing-map colours; explicit sums over the M <= 4 maps
    # are faster on a CPU than a reduction or bmm over a trailing dimension of 4.
    counts = hist[:, 0, :, None].clone()  # (N, S*S, 1)
    color_sum = hist[:, 0, :, None] * map_colors[:, None, 0]  # (N, S*S, 3)
    for m in range(1, MAX_MAPS):
        counts += hist[:, m, :, None]
        color_sum.addcmul_(hist[:, m, :, None], map_colors[:, None, m])
    # Colour by producing map: the mean of the map colours of the pixel's points.
    mean_map_color = color_sum / counts.clamp(min=1.0)  # (N, S*S, 3)
    # Or a gradient over log density in [0, 1] per sample, which shows structure at all scales.
    log_counts = torch.log(counts + 1.0)  # (torch.log1p is several times slower on CPU)
    density = log_counts / log_counts.amax(1, keepdim=True).clamp(min=1e-6)  # (N, S*S, 1)
    low, high = gradient[:, None, 0], gradient[:, None, 1]  # (N, 1, 3) each
    gradient_color = torch.lerp(low, high, density)  # (N, S*S, 3)
    fg = torch.lerp(gradient_color, mean_map_color, by_map[:, None, None])  # by_map is 0. or 1.
    rgb = torch.lerp(background[:, None, :], fg, (counts > 0).float())  # (N, S*S, 3)
    rgb = (rgb * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return rgb.view(n, size, size, 3).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)


def render_fractal(system: IFSSystem, size: int, sample_seed: int, jitter: bool = True) -> Tensor:
    """One image of ``system`` on the CPU, a pure function of (system, size, sample_seed, jitter).

    Returns uint8 (3, size, size). Identical to the same sample of ``render_fractal_batch`` on CPU.
    """
    return _render([system], [sample_seed], size, torch.device("cpu"), jitter)[0]


def render_fractal_batch(
    systems: list[IFSSystem],
    sample_seeds: list[int],
    size: int,
    device: torch.device | str = "cpu",
    jitter: bool = True,
) -> Tensor:
    """A batch rendered on ``device`` (the GPU fast path). Returns uint8 (N, 3, size, size) there.

    Sample i depends only on (systems[i], sample_seeds[i]): on CPU it equals ``render_fractal``;
    on an accelerator it can differ in a few pixels from float rounding, deterministically.
    """
    return _render(list(systems), list(sample_seeds), size, torch.device(device), jitter)


# --- dataset and the GPU batch source -------------------------------------------------------------

_SPLITS = {"train": 0, "val": 1}


class FractalDataset(torch.utils.data.Dataset):
    """K classes, each one IFS system; sample i is class i % K, a fresh render with its own style.

    "train" and "val" share their classes (system seeds depend on (seed, class) only) and never an image (render
    seeds also depend on the split). A key is ``(index, sample_seed)`` from the ``StepSampler`` (a new render every
    epoch) or a plain int (a fixed image, for evaluation)."""

    def __init__(
        self, num_classes: int, samples_per_class: int, size: int, seed: int = 0, split: str = "train"
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        self.num_classes = num_classes
        self.samples_per_class = samples_per_class
        self.size = size
        self.seed = seed
        self.split = split
        self.classes = [f"fractal_{c:03d}" for c in range(num_classes)]
        self._systems: dict[int, IFSSystem] = {}  # per process: each worker fills its own copy

    def __len__(self) -> int:
        return self.num_classes * self.samples_per_class

    def system(self, label: int) -> IFSSystem:
        """The IFS of class ``label``; sampled (and filtered, ~2 ms) on first use, then kept."""
        if label not in self._systems:
            if not 0 <= label < self.num_classes:
                raise IndexError(f"class {label} outside [0, {self.num_classes})")
            self._systems[label] = sample_system(mix64(Family.FRACTAL_DATASET_SYSTEM, self.seed, label))
        return self._systems[label]

    def render_seed(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """(label, render seed) for a key; lets a caller batch renders on the device itself."""
        split = _SPLITS[self.split]
        if isinstance(key, tuple):
            index, sample_seed = int(key[0]), int(key[1])
            seed = mix64(Family.FRACTAL_DATASET_SAMPLE, self.seed, split, index, sample_seed)
        else:
            index = int(key)
            # One value fewer in the hash chain than the tuple case: a separate seed family.
            seed = mix64(Family.FRACTAL_DATASET_SAMPLE, self.seed, split, index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside a FractalDataset of {len(self)} samples")
        return index % self.num_classes, seed

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        label, seed = self.render_seed(key)
        image = render_fractal(self.system(label), self.size, seed)  # (3, S, S) uint8
        return {"image": image, "label": label, "bad_files": ()}


class FractalBatchSource:
    """Micro-batches of ``sampler``'s keys rendered together on ``device`` (the GPU path of data.source=fractal): the
    classes and render seeds of the loader path, batch for batch."""

    def __init__(self, dataset: FractalDataset, sampler: StepSampler, device: torch.device) -> None:
        self.dataset, self.micro_batch, self.device = dataset, sampler.micro_batch, torch.device(device)
        self.keys = iter(sampler)

    def __iter__(self) -> FractalBatchSource:
        return self

    def __next__(self) -> PretrainBatch:
        keys = [next(self.keys) for _ in range(self.micro_batch)]  # StopIteration ends the stream
        labels, seeds = zip(*(self.dataset.render_seed(k) for k in keys))
        systems = [self.dataset.system(label) for label in labels]
        images = render_fractal_batch(systems, list(seeds), self.dataset.size, device=self.device)  # (n, 3, S, S) uint8
        return PretrainBatch(images=images, labels=torch.tensor(labels, device=self.device), bad_files=())
