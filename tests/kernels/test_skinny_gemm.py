"""The skinny GEMM: every ISA variant equals a float64 reference on awkward shapes, the calibration
decides by what it measures and is cached, and a variant can be forced (the AVX2 base stays tested)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from kvlab.errors import ConfigError
from kvlab.kernels import calibrate
from kvlab.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"kvlab CPU kernels: {cpu_kernels.build_failure()}"
)
ALL_VARIANTS = ("avx2", "avx512", "avx512bf16", "amx")


def _supported(variant: str) -> None:
    if variant not in cpu_kernels.supported_variants():
        pytest.skip(f"this CPU lacks the instructions of the {variant} variant")


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 11, 16, 31, 32])
@pytest.mark.parametrize(
    ("out_features", "in_features"),
    # K tails for each step width (8 AVX2, 16 AVX-512, 32 bf16 pairs); N tails of the 8-row blocks;
    # one input row longer than the row-at-a-time walk takes in float32 (8 KiB), not in bf16 pairs.
    [(96, 64), (37, 20), (5, 203), (17, 577), (9, 1000), (1, 1), (6, 2200)],
)
def test_variant_equals_float64_reference(variant, dtype, rows, out_features, in_features):
    _supported(variant)
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    expected = F.linear(x.double(), weight.double(), bias.double())
    out = cpu_kernels.skinny_linear(x, weight, bias, variant=variant)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the result
    torch.testing.assert_close(out.double(), expected, atol=tolerance * 10, rtol=tolerance)


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("out_features", [16, 40, 200])
@pytest.mark.parametrize("in_features", [576, 100, 32])
def test_amx_equals_float32_reference(rows, out_features, in_features):
    """The AMX tiles: one or two B tiles (rows <= 16, 17-32), passes of 32 rows beyond, weight rows
    left over after whole 16-row tiles (40, 200) and a K that tiles cannot take (100), which go to
    the AVX512-BF16 kernel."""
    _supported("amx")
    generator = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    expected = F.linear(x.float(), weight.float())
    out = cpu_kernels.skinny_linear(x, weight, variant="amx")
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    # Products of bf16 values are exact in float32; what differs is summation order, then one
    # bf16 rounding of the result.
    torch.testing.assert_close(out.float(), expected, atol=1e-3 * in_features**0.5, rtol=1e-2)


def test_amx_float32_runs_the_avx512_kernel():
    _supported("amx")
    x, weight = torch.randn(5, 576), torch.randn(40, 576)
    assert torch.equal(
        cpu_kernels.skinny_linear(x, weight, variant="amx"),
        cpu_kernels.skinny_linear(x, weight, variant="avx512"),
    )


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_variant_on_a_non_contiguous_input_and_no_bias(variant):
    _supported(variant)
    x = torch.randn(40, 6)[:, :5].T  # (5, 40) with strides (1, 6)
    weight = torch.randn(24, 40).to(torch.bfloat16)
    out = cpu_kernels.skinny_linear(x.to(torch.bfloat16), weight, variant=variant)
    expected = x.to(torch.bfloat16).double() @ weight.double().T
    torch.testing.assert_close(out.double(), expected, atol=1e-1, rtol=1e-2)


def test_skinny_linear_rejects_mismatched_shapes():
    with pytest.raises(RuntimeError, match="columns"):
        cpu_kernels.skinny_linear(torch.randn(2, 8), torch.randn(4, 9))


def test_op_rejects_an_unknown_variant():
    with pytest.raises(RuntimeError, match="unknown variant 'sse9'"):
        cpu_kernels.skinny_linear(torch.randn(2, 8), torch.randn(4, 8), variant="sse9")


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_one_row_with_the_tiles_option_is_computed_as_in_a_batch(variant):
    """ "<variant>/tiles" runs the register tiles at one input row: the row's outputs are then the same
    floats as in a 2-row product (each output accumulates alike in any tile); the default one-row
    walk sums in another order, equal to the reference within rounding."""
    _supported(variant)
    generator = torch.Generator().manual_seed(7)
    x, weight = torch.randn(2, 577, generator=generator), torch.randn(37, 577, generator=generator)
    batched = cpu_kernels.skinny_linear(x, weight, variant=variant)
    assert torch.equal(cpu_kernels.skinny_linear(x[:1], weight, variant=f"{variant}/tiles"), batched[:1])
    walked = cpu_kernels.skinny_linear(x[:1], weight, variant=variant)
    torch.testing.assert_close(walked, batched[:1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_non_temporal_walk_computes_what_the_walk_computes(variant, dtype):
    """ "<variant>/nt" only adds cache hints to the one-row walk: the same floats, in every K tail
    (577 and 33 columns leave partial vectors; 64 none)."""
    _supported(variant)
    generator = torch.Generator().manual_seed(8)
    for columns in (577, 33, 64):
        x = torch.randn(1, columns, generator=generator).to(dtype)
        weight = torch.randn(41, columns, generator=generator).to(dtype)
        walked = cpu_kernels.skinny_linear(x, weight, variant=variant)
        assert torch.equal(cpu_kernels.skinny_linear(x, weight, variant=f"{variant}/nt"), walked)
        torch.testing.assert_close(walked.float(), x.float() @ weight.float().T, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_variant_reports_its_multiply_add_peak(dtype):
    """The kernel bench's arithmetic floor: each variant's multiply-add on registers, all threads."""
    for variant in cpu_kernels.supported_variants():
        flops = cpu_kernels.peak_flops(variant, dtype, iterations=20_000, repeats=1)
        assert 0 < flops < float("inf")


def test_the_multiply_add_peak_refuses_bad_arguments():
    with pytest.raises(RuntimeError, match="unknown variant 'sse9'"):
        cpu_kernels.ops().skinny_peak_flops("sse9", "float32", 10)
    with pytest.raises(RuntimeError, match="dtype float32 or bfloat16, got float16"):
        cpu_kernels.ops().skinny_peak_flops("avx2", "float16", 10)
    with pytest.raises(RuntimeError, match="iterations must be >= 1"):
        cpu_kernels.ops().skinny_peak_flops("avx2", "float32", 0)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_kernels.peak_flops("avx2", torch.float16)


def test_op_rejects_an_unknown_variant_option():
    with pytest.raises(RuntimeError, match=r"unknown variant option '/rows'.*\(/nt or /tiles\)"):
        cpu_kernels.skinny_linear(torch.randn(1, 8), torch.randn(4, 8), variant="avx2/rows")


def test_supported_variants_follow_what_the_cpu_reports():
    """AVX2 is the base; AVX-512 variants appear exactly when torch sees AVX-512 (and cpuid BF16)."""
    supported = cpu_kernels.supported_variants()
    assert supported[-1] == "avx2"
    has_avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert ("avx512" in supported) == has_avx512
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if flags:
        assert ("avx512bf16" in supported) == (has_avx512 and "avx512_bf16" in flags)
        # AMX also needs Linux to grant the tile state (arch_prctl), so the flags are necessary only.
        if "amx" in supported:
            assert "amx_tile" in flags and "amx_bf16" in flags and "avx512bf16" in supported


def test_unknown_forced_variant_is_a_config_error(monkeypatch):
    monkeypatch.setenv(cpu_kernels.VARIANT_ENV, "sse9")
    with pytest.raises(ConfigError, match="'sse9'.*choose one of .*avx2"):
        cpu_kernels.variants()


def test_forced_avx2_runs_avx2_everywhere():
    """KVLAB_SKINNY_VARIANT=avx2: the calibration only offers AVX2 (vs torch), reports say so, and
    linear() equals torch's product wherever the skinny GEMM takes it."""
    code = (
        "import torch\n"
        "from kvlab.kernels import cpu\n"
        "from kvlab.models.native import linear\n"
        "assert cpu.variants() == ('avx2',), cpu.variants()\n"
        "table = cpu.calibration()\n"
        "assert {d.variant.split('/')[0] for d in table.decisions.values()} == {'avx2'}\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    x, w = torch.randn(3, 40).to(dtype), torch.randn(24, 40).to(dtype)\n"
        "    assert cpu.skinny_variant(dtype, 3) == 'avx2'\n"
        "    torch.testing.assert_close(linear(x, w).double(), x.double() @ w.double().T, atol=0.1, rtol=0.01)\n"
        "print(cpu.describe())\n"
    )
    env = {**os.environ, cpu_kernels.VARIANT_ENV: "avx2"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    skinny = result.stdout.split("quantized GEMM")[0]  # the quantized GEMM's variants are its own
    assert "avx512" not in skinny and ("kvlab avx2" in skinny or "torch" in skinny)


def _fake_calibration(kernel_by_bucket: dict[int, str]) -> calibrate.Calibration:
    decisions = {
        (dtype, rows): calibrate.Decision(kernel_by_bucket[rows], "avx2", {})
        for dtype in calibrate.DTYPES
        for rows in calibrate.ROW_BUCKETS
    }
    return calibrate.Calibration({"threads": 2}, decisions)


def test_takes_skinny_follows_the_calibration(monkeypatch):
    table = _fake_calibration({1: "avx2", 2: "avx2", 4: "torch", 8: "avx2", 16: "torch", 32: "torch"})
    monkeypatch.setattr(cpu_kernels, "calibration", lambda: table)
    weight = torch.randn(16, 8)
    taken = [rows for rows in range(1, 40) if cpu_kernels.takes_skinny(torch.randn(rows, 8), weight)]
    assert taken == [1, 2, 5, 6, 7, 8]  # buckets 1, 2 and 8 (5-8); 3-4, 9-32 torch; > 32 never
    assert not cpu_kernels.takes_skinny(torch.randn(1, 8), torch.randn(8, 16).T)  # non-contiguous weight
    assert (
        "rows 1-2 kvlab avx2, rows 3-4 torch, rows 5-8 kvlab avx2, rows 9-32 torch" in cpu_kernels.describe()
    )


def _tiny_measure(skinny, variants):
    return calibrate.measure(skinny, variants, shapes=((8, 16),), working_set=4096, rounds=3)


def _base(name: str) -> str:
    """A variant's name without its one-row option (/nt, /tiles)."""
    return name.split("/")[0]


@pytest.mark.parametrize(
    "non_temporal_gather_us, expected", [(300.0, "avx2/nt"), (700.0, "avx2/nt"), (1000.0, "avx2")]
)
def test_one_row_is_scored_by_its_pass_plus_what_it_leaves_in_the_caches(
    monkeypatch, non_temporal_gather_us, expected
):
    """Walks whose passes tie are told apart by the footprint probe (a gather over a table warm before
    the pass): the plain walk wins only where the gather after it is faster; a tie goes to the
    non-temporal walk (the same reads, hints added).
    The probe's reading is the calibration's record."""
    probes = {"avx2": 700.0, "avx2/nt": non_temporal_gather_us, "avx2/tiles": 900.0}
    monkeypatch.setattr(
        calibrate, "_hot_set_us", lambda candidates, *args: {n: probes[n] for n in candidates}
    )
    decisions = _tiny_measure(lambda x, w, name: x, ["avx2"])
    for dtype in calibrate.DTYPES:
        one = decisions[(dtype, 1)]
        assert (one.variant, one.kernel) == (expected, expected)
        assert one.hot_set_us == probes
        assert all(decisions[(dtype, rows)].hot_set_us == {} for rows in calibrate.ROW_BUCKETS[1:])


def test_a_faster_pass_is_not_outvoted_by_the_footprint_probe(monkeypatch):
    """A walk 20 ms a pass slower loses though the probe favours it by 0.4 ms."""
    monkeypatch.setattr(
        calibrate,
        "_hot_set_us",
        lambda candidates, *args: {n: 300.0 if n.endswith("/nt") else 700.0 for n in candidates},
    )

    def skinny(x, w, name):
        if name.endswith("/nt"):
            time.sleep(0.02)
        return x

    decisions = _tiny_measure(skinny, ["avx2"])
    assert all(decisions[(dtype, 1)].variant in ("avx2", "avx2/tiles") for dtype in calibrate.DTYPES)


@pytest.mark.parametrize(
    "variants, passes, probes, rows, expected",
    [
        # the probe picks /nt; torch ties the plain walk's pass, not /nt's: kvlab keeps the bucket
        (
            ["avx2"],
            {"avx2": 2.0, "avx2/nt": 2.05, "avx2/tiles": 3.0},
            {"avx2/nt": 300.0},
            1,
            ("avx2/nt", "avx2/nt"),
        ),
        # ties do not chain: torch within 3% of avx2 (10.0) loses though avx512 (10.2) won its tie with avx2
        (["avx512", "avx2"], {"avx512": 10.2, "avx2": 10.0}, {}, 2, ("avx512", "avx512")),
        # torch more than 3% faster than every kvlab candidate takes the bucket
        (["avx2"], {"avx2": 2.0, "avx2/nt": 2.0, "avx2/tiles": 3.0}, {}, 1, ("torch", "avx2/nt")),
    ],
)
def test_torch_takes_a_bucket_only_where_it_beats_every_kvlab_candidate(
    monkeypatch, variants, passes, probes, rows, expected
):
    torch_ms = 1.95 if expected[0] != "torch" else 1.9
    passes = {**passes, "torch": 9.9 if rows == 2 else torch_ms}
    monkeypatch.setattr(
        calibrate, "_pass_ms", lambda candidates, *args: {n: passes.get(n, 50.0) for n in candidates}
    )
    monkeypatch.setattr(
        calibrate, "_hot_set_us", lambda candidates, *args: {n: probes.get(n, 700.0) for n in candidates}
    )
    decision = _tiny_measure(lambda x, w, name: x, variants)[("float32", rows)]
    assert (decision.kernel, decision.variant) == expected


def test_the_amx_kernel_has_no_non_temporal_walk_to_time():
    """At one row the AMX kernel runs its tiles whatever the option: only a walk gets a /nt twin."""
    assert calibrate.one_row_options(["amx", "avx2"]) == ["avx2/nt", "amx", "avx2", "amx/tiles", "avx2/tiles"]


def test_the_footprint_probe_times_each_candidate_after_its_pass():
    calls = []
    weights, inputs = [torch.randn(8, 16)], [torch.randn(1, 16)]
    probes = calibrate._hot_set_us(
        {"a": lambda x, w: calls.append("a"), "b": lambda x, w: calls.append("b")}, weights, inputs, 3
    )
    assert calls == ["a", "b"] * 3
    assert set(probes) == {"a", "b"} and all(0 < us < 1e6 for us in probes.values())


def test_calibration_picks_torch_where_the_kernel_is_slower():
    """A kernel that takes 20 ms per call loses to torch on a tiny matrix; an instant one wins."""

    def slow(x, w, name):
        time.sleep(0.02)
        return x

    def instant(x, w, name):
        return x

    assert {d.kernel for d in _tiny_measure(slow, ["avx2"]).values()} == {"torch"}
    fast = _tiny_measure(instant, ["avx2"])
    assert {_base(d.kernel) for d in fast.values()} == {"avx2"}  # the walk, /nt or the tiles
    assert set(fast) == {(dtype, rows) for dtype in calibrate.DTYPES for rows in calibrate.ROW_BUCKETS}


def test_calibration_picks_the_faster_variant():
    def skinny(x, w, name):
        if name.startswith("avx2"):
            time.sleep(0.02)
        return x

    decisions = _tiny_measure(skinny, ["avx512", "avx2"])
    assert {_base(d.variant) for d in decisions.values()} == {"avx512"}
    assert all(d.ms["avx2"] > d.ms["avx512"] for d in decisions.values())


def test_calibration_times_the_tiles_against_the_walk_at_one_row():
    def skinny(x, w, name):
        if not name.endswith(calibrate.TILES):
            time.sleep(0.02)
        return x

    decisions = _tiny_measure(skinny, ["avx2"])
    for dtype in calibrate.DTYPES:
        assert decisions[(dtype, 1)].variant == "avx2/tiles"
        assert set(decisions[(dtype, 1)].ms) == {"avx2", "avx2/nt", "avx2/tiles", "torch"}
        assert {decisions[(dtype, rows)].variant for rows in calibrate.ROW_BUCKETS[1:]} == {"avx2"}


def test_calibration_is_cached_and_reloaded(tmp_path, monkeypatch):
    calls = []

    def skinny(x, w, name):
        calls.append(name)
        return x

    shapes = ((8, 16),)

    def load(digest):
        return calibrate.load_or_measure(tmp_path, digest, ["avx2"], skinny, shapes, working_set=4096)

    first = load("digest-a")
    assert first.measured_now and first.path.exists() and calls
    stored = json.loads(first.path.read_text())
    assert stored["key"]["kernels"] == "digest-a" and stored["key"]["threads"] == torch.get_num_threads()
    assert set(stored["decisions"]) == {"float32", "bfloat16"}
    calls.clear()
    again = load("digest-a")
    assert not again.measured_now and not calls and again.decisions == first.decisions
    # A new build, another thread count: measured again, into another file.
    rebuilt = load("digest-b")
    assert rebuilt.measured_now and rebuilt.path != first.path
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other = load("digest-a")
    finally:
        torch.set_num_threads(threads)
    assert other.measured_now and other.path not in (first.path, rebuilt.path)
    # A damaged file is measured again, not trusted.
    first.path.write_text("{not json")
    assert load("digest-a").measured_now


def test_bucket_maps_rows_to_the_smallest_calibrated_size():
    rows = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)
    assert [calibrate.bucket(r) for r in rows] == [1, 2, 4, 4, 8, 8, 16, 16, 32, 32]
    with pytest.raises(ValueError, match="33"):
        calibrate.bucket(33)
