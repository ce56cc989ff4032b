"""Checks for chapter 08: the roofline floor, the in-register tile map, a tuned config."""

from __future__ import annotations

import math
import random

import torch

from moe_learn.course.checks._core import call_learner, fail, passed
from moe_learn.course.exercises import Exercise
from moe_learn.device import DEVICE, ON_GPU

NOTEBOOK = "08_performance.ipynb"

EXERCISES = [
    Exercise(
        id="08.1",
        notebook=NOTEBOOK,
        title="roofline_floor: the least time a grouped GEMM can take, and which floor decides",
        hints=(
            "FLOPs: every one of the M rows meets one expert: 2 * M * N * K. Bytes: X (M x K) once, the weights "
            "of ALL E experts (E x N x K) once, Y (M x N) once, times elem_bytes.",
            "Compute time = FLOPs / (peak_tflops * 1e12); memory time = bytes / (bandwidth_tbs * 1e12). "
            "Both peaks are in units of 10^12 per second.",
            "The kernel cannot beat either floor, so the floor is the LARGER of the two times; "
            "bound is 'memory' when the memory time is the larger one, else 'compute'.",
        ),
    ),
    Exercise(
        id="08.2",
        notebook=NOTEBOOK,
        title="locate_tile_prefix: a tile's expert and position from prefix sums, M fastest",
        hints=(
            "Per expert: m_tiles = cdiv(m_sizes, BLOCK_M); tiles = m_tiles * cdiv(N, BLOCK_N). "
            "tile_end = torch.cumsum(tiles, 0) (inclusive), tile_begin = tile_end - tiles.",
            "The expert is the number of experts whose tiles all end at or before tile_id: "
            "(tile_end <= tile_id).sum(). Empty experts have tile_begin == tile_end, so they are skipped for free.",
            "local = tile_id - tile_begin[e]; M fastest: tile_m = local % m_tiles[e], tile_n = local // m_tiles[e]; "
            "row_start = (cumsum(m_sizes) - m_sizes)[e] + tile_m * BLOCK_M.",
        ),
    ),
    Exercise(
        id="08.3",
        notebook=NOTEBOOK,
        title="tuned_config: launch parameters for the Hopper kernel, checked for validity and correctness",
        hints=(
            "Return a dict with some of BLOCK_M, BLOCK_N, BLOCK_K (powers of two >= 16), num_warps (4 or 8), "
            "num_stages (2-5), FLATTEN, WARP_SPECIALIZE (not both True), NUM_PROGRAMS.",
            "Few rows per expert (M / E small): the weights dominate; a 64-row tile wastes less of a half-empty "
            "row block and a deep BLOCK_K streams W in fewer steps.",
            "Many rows per expert: 128x256x64 tiles with 8 warps and 3-4 stages keep the tensor cores busy. "
            "Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes; keep stages * that under ~200 KB.",
        ),
    ),
]


# ------------------------------------------------------------------------------ 08.1

_UNITS = {1e3: "milliseconds", 1e6: "microseconds", 1e9: "nanoseconds", 1e-3: "thousands of seconds"}


def _floors(M, N, K, E, peak, bw, elem):
    flops = 2.0 * M * N * K
    nbytes = float(elem) * (M * K + E * N * K + M * N)
    return flops / (peak * 1e12), nbytes / (bw * 1e12)


def _roofline_mistakes(M, N, K, E, peak, bw, elem):
    """(what the mistake computes, hint) for the floors plausible mistakes give."""
    t_c, t_m = _floors(M, N, K, E, peak, bw, elem)
    flops = 2.0 * M * N * K

    def mem(nbytes):
        return nbytes / (bw * 1e12)

    out = [
        (max(t_c, mem(elem * (M * K + N * K + M * N))),
         "you counted the weights of one expert only: all E experts' weights (E * N * K elements) are read, "
         "each once, because every expert that has rows needs its whole W[e]"),
        (max(t_c * E, t_m),
         "you counted the FLOPs of all M rows for every expert (x E): each row meets only its own expert, "
         "so the FLOPs are 2 * M * N * K"),
        (max(t_c, mem(elem * (E * M * K + E * N * K + E * M * N))),
         "you counted X and Y once per expert (x E): each row of X is read once and each row of Y written once, "
         "by the one expert it belongs to"),
        (max(t_c, mem(elem * (M * K + E * N * K))),
         "you forgot the bytes of the output Y (M x N elements written once)"),
        (max(t_c, mem(elem * (E * N * K + M * N))),
         "you forgot the bytes of the input X (M x K elements read once)"),
        (max(t_c / 2, t_m),
         "you counted M * N * K FLOPs: a multiply-add is 2 FLOPs, so a GEMM is 2 * M * N * K"),
        (max(t_c, t_m / elem),
         "you counted elements, not bytes: multiply by elem_bytes (2 for bf16/fp16)"),
        (min(t_c, t_m),
         "you took the smaller time: the kernel cannot beat EITHER floor, so the floor is the larger one (max)"),
        (max(flops / (peak * 1e12), t_m * 1e3),
         "you mixed units: bandwidth is in TB/s (10^12 bytes per second), like the peak in TFLOP/s (10^12 FLOP/s)"),
        (max(t_c * 1e3, t_m),
         "you mixed units: peak_tflops is in TFLOP/s (10^12 FLOP/s), like the bandwidth in TB/s (10^12 bytes/s)"),
    ]
    return out


def check_roofline_floor(roofline_floor) -> None:
    """``roofline_floor(M, N, K, E, peak_tflops, bandwidth_tbs, elem_bytes=2) -> (seconds, bound)``."""
    ex = "08.1"
    rng = random.Random(808)
    # (M, N, K, E, peak TFLOP/s, bandwidth TB/s, elem bytes, what); none sits within 5% of the ridge
    cases = [
        (8192, 1536, 2048, 128, 788.0, 3.02, 2, "qwen3 gate_up, 1024 tokens (8 rows per token): H100 bf16"),
        (16384, 28672, 4096, 8, 788.0, 3.02, 2, "mixtral gate_up, 8192 tokens: H100 bf16"),
        (1024, 5120, 8192, 16, 788.0, 3.02, 2, "llama4-scout down, 1024 tokens: H100 bf16"),
        (32768, 2880, 2880, 32, 788.0, 3.02, 2, "gpt-oss down, 8192 tokens: H100 bf16"),
        (4096, 1024, 512, 4, 50.0, 0.9, 4, "fp32 on a smaller GPU (elem_bytes=4)"),
        (1, 256, 128, 64, 100.0, 1.0, 2, "one row, many experts"),
    ]
    while len(cases) < 12:
        M, N, K, E = rng.choice([64, 512, 4096, 32768]), rng.choice([256, 1536, 4096]), rng.choice([512, 2048]), \
            rng.choice([4, 16, 64])
        peak, bw = rng.choice([(788.0, 3.02), (312.0, 2.0), (60.0, 1.0)])
        t_c, t_m = _floors(M, N, K, E, peak, bw, 2)
        if abs(t_c - t_m) > 0.05 * max(t_c, t_m):
            cases.append((M, N, K, E, peak, bw, 2, "random shape"))
    # Call on every case first: a mistake is named only when it explains ALL the answers,
    # since one case alone can match two different mistakes.
    answers = []
    for M, N, K, E, peak, bw, elem, what in cases:
        args = (M, N, K, E, peak, bw, elem)
        got = call_learner(ex, roofline_floor, *args)
        setting = f"M={M}, N={N}, K={K}, E={E}, peak {peak:g} TFLOP/s, {bw:g} TB/s, elem_bytes={elem} ({what})"
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            fail(ex, f"roofline_floor returned {got!r}; expected a pair (floor_seconds, bound). {setting}")
        seconds, bound = got
        try:
            seconds = float(seconds)
        except (TypeError, ValueError):
            fail(ex, f"the floor should be a number of seconds, got {seconds!r}. {setting}")
        answers.append((args, setting, seconds, bound))

    def explains(values) -> bool:
        return all(math.isclose(a[2], v, rel_tol=1e-6) for a, v in zip(answers, values, strict=True))

    regimes = {"memory": 0, "compute": 0}
    for args, setting, seconds, bound in answers:
        t_c, t_m = _floors(*args)
        want = max(t_c, t_m)
        want_bound = "memory" if t_m >= t_c else "compute"
        regimes[want_bound] += 1
        if not math.isclose(seconds, want, rel_tol=1e-6):
            head = (f"floor {seconds:.4g} s, expected {want:.4g} s "
                    f"(compute {t_c * 1e6:.1f} µs, memory {t_m * 1e6:.1f} µs)")
            per_case = [_roofline_mistakes(*a[0]) for a in answers]
            for i, (_, hint) in enumerate(per_case[0]):
                if explains([m[i][0] for m in per_case]):
                    fail(ex, f"{head}. {setting}", hint)
            for factor, unit in _UNITS.items():
                if explains([max(_floors(*a[0])) * factor for a in answers]):
                    fail(ex, f"floor {seconds:.4g}, expected {want:.4g} seconds. {setting}",
                         f"you returned {unit}: return seconds (the peaks are per second)")
            fail(ex, f"{head}. {setting}",
                 "compute time = 2*M*N*K / (peak_tflops * 1e12); memory time = (M*K + E*N*K + M*N) * elem_bytes / "
                 "(bandwidth_tbs * 1e12); the floor is the larger")
        if bound not in ("memory", "compute"):
            fail(ex, f"bound should be the string 'memory' or 'compute', got {bound!r}. {setting}")
        if bound != want_bound:
            fail(ex, f"bound is {bound!r} but the {want_bound} time is the larger "
                     f"(compute {t_c * 1e6:.1f} µs, memory {t_m * 1e6:.1f} µs). {setting}",
                 "the bound is the floor that decides: 'memory' when moving the bytes takes longer than the math")
    passed(ex, f"roofline floor ({regimes['memory']} memory-bound, {regimes['compute']} compute-bound)", len(cases))


# ------------------------------------------------------------------------------ 08.2


def _m_fastest_schedule(m_sizes: list[int], N: int, block_m: int, block_n: int):
    from moe_learn.kernels.schedule import tile_schedule  # needs Triton; EXERCISES must load without it

    # GROUP_M as large as any expert's row-block count: inside an expert, tile_m runs fastest
    return tile_schedule(m_sizes, N, block_m, block_n, num_programs=1, GROUP_M=max([*m_sizes, 1]))


def check_locate_tile_prefix(locate_tile_prefix) -> None:
    """``locate_tile_prefix(tile_id, m_sizes, BLOCK_M, N, BLOCK_N) -> (expert, tile_m, tile_n, row_start)``."""
    ex = "08.2"
    rng = random.Random(8082)
    cases = [
        ([40, 40, 40], 16, 48, 16, "equal experts, 3 row blocks x 3 column blocks each"),
        ([5, 0, 37, 1, 0, 18], 16, 72, 32, "empty experts and ragged sizes"),
        ([0, 0, 33], 16, 40, 16, "empty experts before the only busy one"),
        ([33, 17, 0, 0], 16, 64, 32, "empty experts at the end"),
        ([1], 16, 16, 16, "one token"),
        ([64, 1, 63], 32, 100, 32, "sizes around BLOCK_M, N not a multiple of BLOCK_N"),
    ]
    for _ in range(4):
        cases.append(([rng.choice([0, rng.randint(1, 70)]) for _ in range(rng.randint(1, 7))],
                      rng.choice([8, 16, 32]), rng.choice([16, 40, 96]), rng.choice([16, 32]), "random sizes"))
    checked = 0
    for m_sizes, block_m, N, block_n, what in cases:
        schedule = _m_fastest_schedule(m_sizes, N, block_m, block_n)
        first_row = [sum(m_sizes[:e]) for e in range(len(m_sizes))]
        first_tile = {}
        for r in schedule:
            first_tile.setdefault(r.expert, r.tile_id)
        sizes = torch.tensor(m_sizes, dtype=torch.int32)
        setting = f"m_sizes={m_sizes}, BLOCK_M={block_m}, N={N}, BLOCK_N={block_n} ({what})"
        for r in schedule:
            want = (r.expert, r.tile_m, r.tile_n, r.row_start)
            got = call_learner(ex, locate_tile_prefix, r.tile_id, sizes.clone(), block_m, N, block_n)
            checked += 1
            try:
                got_t = tuple(int(v) for v in got)
            except (TypeError, ValueError):
                fail(ex, f"tile {r.tile_id}: you returned {got!r}; expected a tuple of 4 ints "
                         f"(expert, tile_m, tile_n, row_start). {setting}")
            if len(got_t) != 4:
                fail(ex, f"tile {r.tile_id}: you returned {got!r}; expected 4 values "
                         f"(expert, tile_m, tile_n, row_start). {setting}")
            if got_t == want:
                continue
            e, tm, tn, rs = got_t
            head = f"tile {r.tile_id}: got (expert {e}, tile_m {tm}, tile_n {tn}, row_start {rs}), expected " \
                   f"(expert {r.expert}, tile_m {r.tile_m}, tile_n {r.tile_n}, row_start {r.row_start}). {setting}"
            if e != r.expert:
                if 0 <= e < len(m_sizes) and m_sizes[e] == 0:
                    fail(ex, head, f"expert {e} has no rows, so it owns no tiles: count tiles per expert "
                                   "(cdiv(m_sizes, BLOCK_M) * column blocks), not experts")
                if r.tile_id == first_tile[r.expert] and e < r.expert:
                    fail(ex, head, "this is the first tile of its expert: an expert whose tiles END at tile_id is "
                                   "already behind it, so count (tile_end <= tile_id), not (tile_end < tile_id)")
                if e == r.expert + 1:
                    fail(ex, head, "off by one expert: with the inclusive prefix sum tile_end, the expert is "
                                   "(tile_end <= tile_id).sum(), with no +1")
                fail(ex, head, "the expert owns tiles [tile_begin, tile_end) with tile_end = cumsum(m_tiles * "
                               "n_tiles) (m_tiles = cdiv(m_sizes, BLOCK_M), rounding up)")
            n_tiles = -(-N // block_n)
            floor_m = m_sizes[e] // block_m
            local = r.tile_id - first_tile[r.expert]
            if (tm, tn) != (r.tile_m, r.tile_n):
                if floor_m and (tm, tn) == (local % floor_m, local // floor_m):
                    fail(ex, head, "m_tiles must round UP: cdiv(m_sizes, BLOCK_M) = (m + BLOCK_M - 1) // BLOCK_M; "
                                   "a partly full last row block is a tile too")
                if (tm, tn) == (local // n_tiles, local % n_tiles):
                    fail(ex, head, "that is N-fastest order; the kernel runs M fastest inside an expert "
                                   "(tile_m = local % m_tiles, tile_n = local // m_tiles), so programs running "
                                   "together share one weight tile")
                fail(ex, head, "local = tile_id - tile_begin[expert]; tile_m = local % m_tiles, "
                               "tile_n = local // m_tiles (m_tiles of THIS expert)")
            if rs == first_row[e]:
                fail(ex, head, "row_start is the first row of the TILE: the expert's first row plus tile_m * BLOCK_M")
            if rs == first_row[e] + 1 or rs == first_row[e] + m_sizes[e] + tm * block_m:
                fail(ex, head, "the expert's first row is the EXCLUSIVE prefix sum: cumsum(m_sizes) - m_sizes")
            fail(ex, head, "row_start = (cumsum(m_sizes) - m_sizes)[expert] + tile_m * BLOCK_M")
    passed(ex, "tile map from prefix sums (M fastest, empty experts, ragged sizes)", checked)


# ------------------------------------------------------------------------------ 08.3

_HOPPER_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "FLATTEN", "WARP_SPECIALIZE",
                "NUM_PROGRAMS")
SHARED_MEMORY_BYTES = 227 * 1024  # per block on an H100


def _validate_config(ex: str, config, where: str) -> dict:
    if not isinstance(config, dict):
        fail(ex, f"tuned_config returned {type(config).__name__}, expected a dict of launch parameters ({where})")
    unknown = sorted(set(config) - set(_HOPPER_KEYS))
    if "GROUP_M" in unknown:
        fail(ex, f"config has GROUP_M ({where})",
             "GROUP_M belongs to the portable kernel of chapter 06; the Hopper kernel orders tiles M-fastest "
             "inside each expert by itself. Drop the key")
    if unknown:
        fail(ex, f"config has unknown keys {unknown} ({where}); allowed: {list(_HOPPER_KEYS)}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if key in config:
            v = config[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
                fail(ex, f"config[{key!r}] = {v!r} ({where})",
                     "tile sizes must be powers of two and at least 16: tl.dot and TMA need them")
    for key in ("num_warps", "num_stages", "NUM_PROGRAMS"):
        if key in config:
            v = config[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(ex, f"config[{key!r}] = {v!r} ({where}); it must be a positive int")
    if "num_warps" in config and config["num_warps"] not in (1, 2, 4, 8, 16):
        fail(ex, f"config['num_warps'] = {config['num_warps']} ({where})", "num_warps must be a power of two (4 or 8)")
    for key in ("FLATTEN", "WARP_SPECIALIZE"):
        if key in config and not isinstance(config[key], bool):
            fail(ex, f"config[{key!r}] = {config[key]!r} ({where}); it must be True or False")
    return config


def _resolved(config: dict, M: int, E: int) -> dict:
    from moe_learn.kernels.grouped_gemm_hopper import pick_config

    return {**pick_config(M, E), **config}


def _check_resolved(ex: str, cfg: dict, where: str) -> None:
    if cfg["FLATTEN"] and cfg["WARP_SPECIALIZE"]:
        fail(ex, f"config turns on both FLATTEN and WARP_SPECIALIZE ({where})",
             "flattening and warp specialisation don't go together in this kernel: set FLATTEN=False "
             "when WARP_SPECIALIZE=True")
    smem = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * 2 * cfg["num_stages"]
    if smem > SHARED_MEMORY_BYTES:
        fail(ex, f"config needs about {smem // 1024} KB of shared memory for its {cfg['num_stages']} stages of "
                 f"bf16 X and W tiles; an H100 has {SHARED_MEMORY_BYTES // 1024} KB ({where})",
             "fewer stages or a smaller BLOCK_K: each stage holds (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes")


def _routing_sizes(T: int, E: int, topk: int, seed: int, empty=()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    for e in empty:
        scores[:, e] = -1.0
    ids = scores.topk(topk, dim=1).indices
    return torch.bincount(ids.flatten(), minlength=E).to(torch.int32)


def _run_and_compare(ex, config, m_sizes, N, K, dtype, where):
    from moe_learn.kernels.grouped_gemm import grouped_gemm
    from moe_learn.ops.grouped_gemm import torch_grouped_gemm

    E = m_sizes.numel()
    M = int(m_sizes.sum())
    X = torch.randn(M, K, device=DEVICE).to(dtype)
    W = (torch.randn(E, N, K, device=DEVICE) / K**0.5).to(dtype)
    sizes = m_sizes.to(DEVICE)
    out = torch.full((M, N), float("nan"), device=DEVICE, dtype=dtype)  # poisoned: unwritten rows stay NaN
    try:
        grouped_gemm(X, W, sizes, out=out, kernel="hopper", config=config)
    except Exception as exc:  # noqa: BLE001 - the learner's config did not launch: say why
        fail(ex, f"the Hopper kernel could not run your config {config} ({where}): {type(exc).__name__}: {exc}",
             "check tile sizes against shared memory and the compiler's limits; try the defaults "
             "(grouped_gemm_hopper.pick_config) and change one thing at a time")
    ref = torch_grouped_gemm(X.double(), W.double(), sizes)
    bad = ~torch.isfinite(out)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0])
        fail(ex, f"row {row} of the output was never written with config {config} ({where})")
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    bound = 1e-2 if dtype == torch.bfloat16 else 3e-3 if dtype == torch.float16 else 5e-4
    if err > bound:
        fail(ex, f"relative error {err:.2e} against float64 with config {config} ({where}); expected <= {bound:g}")
    return X, W, sizes, out


def check_tuning_config(tuned_config, *, time_on_gpu: bool = True) -> None:
    """``tuned_config(M, N, K, E) -> dict`` for ``grouped_gemm(..., kernel="hopper", config=...)``.

    Validity and correctness on every device (poisoned output, float64 reference); on a GPU
    also the time against the untuned default and ``torch._grouped_mm``, and the roofline.
    Speed is reported, never judged.
    """
    ex = "08.3"
    # CPU: tiny shapes through the interpreter (fp32); the config's tile sizes still cut them into tiles
    cases = [
        (_routing_sizes(24, 6, 2, 1, empty=(1, 4)), 64, 64, "ragged, two empty experts"),
        (_routing_sizes(40, 4, 1, 2), 96, 48, "N and K not multiples of a large tile"),
        (torch.tensor([0, 1, 0], dtype=torch.int32), 32, 64, "one row"),
    ]
    dtype = torch.float32
    if ON_GPU:
        dtype = torch.bfloat16
        cases.append((_routing_sizes(4096, 64, 4, 3), 1024, 512, "4096 tokens, 64 experts, top-4"))
    for m_sizes, N, K, what in cases:
        M, E = int(m_sizes.sum()), m_sizes.numel()
        where = f"M={M}, N={N}, K={K}, E={E}: {what}"
        config = _validate_config(ex, call_learner(ex, tuned_config, M, N, K, E), where)
        _check_resolved(ex, _resolved(config, M, E), where)
        _run_and_compare(ex, config, m_sizes, N, K, dtype, where)
    passed(ex, "tuned config valid and correct (poisoned output, float64 reference)", len(cases))
    if ON_GPU and time_on_gpu:
        _time_on_gpu(tuned_config)


def _time_on_gpu(tuned_config) -> None:
    from moe_learn.bench.cases import cases
    from moe_learn.bench.timing import measure_peaks

    peaks = measure_peaks()
    print(f"measured here: {peaks['matmul_tflops']:.0f} TFLOP/s bf16 matmul, {peaks['copy_tbs']:.2f} TB/s copy")
    print(f"{'case':<30} {'yours':>8} {'default':>8} {'_gmm':>8} {'floor':>8}  yours/floor")
    for case in [c for c in cases(["qwen3-30b-a3b"]) if c.gemm == "gate_up"]:
        _time_case(case, tuned_config(case.M, case.N, case.K, case.E), peaks)


def _time_case(case, config: dict, peaks: dict) -> None:
    """One line: the learner's config, the untuned default and torch._grouped_mm, against the floor."""
    from moe_learn.bench.cases import MODELS, routing_counts
    from moe_learn.bench.timing import do_bench
    from moe_learn.kernels.grouped_gemm import grouped_gemm
    from moe_learn.kernels.grouped_gemm_hopper import pick_config

    m_sizes = routing_counts(case.tokens, case.E, MODELS[case.model][3], seed=0)
    X = torch.randn(case.M, case.K, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(case.E, case.N, case.K, device="cuda", dtype=torch.bfloat16) * 0.02
    offs = torch.cumsum(m_sizes, 0, dtype=torch.int32)
    Wt = W.transpose(1, 2)  # [E, K, N] view: the layout _grouped_mm takes
    y = torch.empty(case.M, case.N, device="cuda", dtype=torch.bfloat16)
    default = pick_config(case.M, case.E)
    t_yours = do_bench(lambda: grouped_gemm(X, W, m_sizes, out=y, kernel="hopper", config=config))
    t_default = do_bench(lambda: grouped_gemm(X, W, m_sizes, out=y, kernel="hopper", config=default))
    t_gmm = do_bench(lambda: torch._grouped_mm(X, Wt, offs=offs))
    floor = max(case.flops / (peaks["matmul_tflops"] * 1e12), case.bytes() / (peaks["copy_tbs"] * 1e12))
    print(f"{case.name:<30} {t_yours * 1e6:>6.0f}µs {t_default * 1e6:>6.0f}µs {t_gmm * 1e6:>6.0f}µs "
          f"{floor * 1e6:>6.0f}µs  {floor / t_yours:.0%}")
