"""Fused NAG update kernels (pallas_kernels/nag_update) against the pure-JAX reference.

On CPU both kernels run in interpret mode: the GPU (Triton) kernel body through Pallas' generic
interpreter, the TPU (Mosaic) kernel through the TPU interpreter. Uninitialised output memory is NaN
in both, so "no NaN in any output" also checks that every output element is written, and ragged
token counts check that padded rows never leak into the parameter gradients. The lowering of both
kernels for their real targets (Triton IR for CUDA, Mosaic for TPU) is checked on CPU by
cross-platform export. `@pytest.mark.gpu` runs the compiled Triton kernel on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.nag_update import nag_update, reference
from pallas_kernels.nag_update.gpu import GpuConfig
from pallas_kernels.nag_update.tpu import TpuConfig

F32, BF16 = jnp.float32, jnp.bfloat16
ARGNAMES = ("f", "D", "alpha", "beta", "W", "b", "logits")


def make_inputs(n, d, *, c=32, fdt=F32, ddt=F32, seed=0, bias_shift=0.0, lead=None, alpha=0.7):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    shape = (n, d) if lead is None else (*lead, d)
    f = (jax.random.normal(ks[0], shape) + 0.2).astype(fdt)
    dd = jax.random.normal(ks[1], shape)
    dd = (dd * jax.lax.rsqrt(jnp.mean(dd * dd, -1, keepdims=True))).astype(ddt)
    lim = (3.0 / d) ** 0.5
    w = jax.random.uniform(ks[2], (c, d), minval=-lim, maxval=lim)
    b = 0.5 * jax.random.normal(ks[3], (c,)) + bias_shift
    logits = 0.5 * jax.random.normal(ks[4], (c,))
    return f, dd, jnp.float32(alpha), jnp.float32(1.3), w, b, logits


def _loss(fn):
    """A loss touching all three outputs with non-trivial cotangents."""

    def loss(*args):
        y, lg, m = fn(*args)
        wy = jnp.cos(jnp.arange(y.size, dtype=F32).reshape(y.shape))
        wm = jnp.sin(jnp.arange(m.size, dtype=F32).reshape(m.shape))
        return jnp.sum(y.astype(F32) * wy) + 1.7 * jnp.sum(lg) + jnp.sum(m * wm), (y, lg, m)

    return loss


def _value_and_grads(fn, args):
    g = jax.jit(jax.value_and_grad(_loss(fn), argnums=tuple(range(7)), has_aux=True))
    (_, outs), grads = g(*args)
    return outs, grads


def _f32(x):
    return np.asarray(jnp.asarray(x, F32))


def check_against_reference(impl, args, tiling=None, interpret=None):
    outs, grads = _value_and_grads(
        lambda *a: nag_update(*a, impl=impl, tiling=tiling, interpret=interpret), args)
    r_outs, r_grads = _value_and_grads(reference.nag_update, args)
    low = args[1].dtype == BF16 or args[0].dtype == BF16

    # Forward: D' in D's dtype (one bf16 rounding apart at most), l and m in float32.
    y, lg, m = outs
    ry, rlg, rm = r_outs
    assert y.dtype == ry.dtype and y.shape == ry.shape
    assert lg.dtype == F32 and m.dtype == F32 and lg.shape == rlg.shape and m.shape == rm.shape
    for name, a in zip(("y", "l", "m"), outs):
        assert np.isfinite(_f32(a)).all(), f"{name}: non-finite (unwritten or leaked) values"
    ytol = 2e-2 if y.dtype == BF16 else 2e-5
    np.testing.assert_allclose(_f32(y), _f32(ry), atol=ytol, rtol=ytol)
    stol = 2e-4 if low else 2e-6
    np.testing.assert_allclose(_f32(lg), _f32(rlg), atol=stol, rtol=stol)
    np.testing.assert_allclose(_f32(m), _f32(rm), atol=stol, rtol=stol)

    # Gradients of every input, relative to the largest reference entry of that gradient.
    for name, a, gk, gr in zip(ARGNAMES, args, grads, r_grads):
        assert gk.shape == jnp.shape(a) and gk.dtype == jnp.asarray(a).dtype, name
        gk, gr = _f32(gk), _f32(gr)
        assert np.isfinite(gk).all(), f"d{name}: non-finite"
        scale = np.max(np.abs(gr)) + 1e-30
        bf16_out = jnp.asarray(a).dtype == BF16
        tol = 2e-2 if bf16_out else (1e-3 if low else 5e-5)
        err = np.max(np.abs(gk - gr)) / scale
        assert err < tol, f"d{name}: max |kernel - ref| / max |ref| = {err:.3g} >= {tol}"
        if bf16_out:  # elementwise bf16 rounding aside, the bulk must agree much better
            assert np.mean(np.abs(gk - gr)) / scale < 2e-3, name


# The widths the model runs (d = 64, 256, 768, 1024, 2048), ragged token counts, bf16 and float32
# f and D in several mixes, the gate floor (bias shift: some rows clamped), for both kernels in the
# interpreter; the GPU tilings cover several column chunks per row (the fori_loop path: d = 256 in
# 4 chunks, 768 in 3), one chunk per row (d = 64, 1024), 8 warps and the 2-pass forward. Small
# token counts: the interpreter is slow, and a block of rows is the unit of work either way.
SHAPES = [  # (n, d, f dtype, D dtype, bias shift, GPU tiling, TPU tiling)
    (37, 64, F32, F32, 0.0, GpuConfig(block_rows=16), TpuConfig(block_rows=16)),
    (100, 256, BF16, BF16, -14.25, GpuConfig(block_rows=16, block_cols=64), TpuConfig(block_rows=32)),
    (45, 768, BF16, BF16, 0.0, None, None),
    (21, 1024, F32, BF16, 0.0, GpuConfig(block_rows=16, block_cols=1024), None),
    (19, 2048, BF16, F32, 0.0, GpuConfig(block_rows=32, block_cols=512, num_warps=8, fwd_passes=2),
     None),
]
SHAPE_IDS = [f"n{n}-d{d}-f{jnp.dtype(f).name}-D{jnp.dtype(dd).name}" for n, d, f, dd, *_ in SHAPES]
GPU_CASES = [pytest.param(n, d, f, dd, g, s, id=i) for (n, d, f, dd, s, g, _), i in zip(SHAPES, SHAPE_IDS)]
TPU_CASES = [pytest.param(n, d, f, dd, t, s, id=i) for (n, d, f, dd, s, _, t), i in zip(SHAPES, SHAPE_IDS)]
GATE_FLOOR_CASE = SHAPES[1]


@pytest.mark.parametrize("n,d,fdt,ddt,tiling,shift", GPU_CASES)
def test_gpu_kernel_interpret_matches_reference(n, d, fdt, ddt, tiling, shift):
    args = make_inputs(n, d, fdt=fdt, ddt=ddt, bias_shift=shift)
    check_against_reference("pallas_gpu", args, tiling=tiling, interpret=True)


@pytest.mark.parametrize("n,d,fdt,ddt,tiling,shift", TPU_CASES)
def test_tpu_kernel_interpret_matches_reference(n, d, fdt, ddt, tiling, shift):
    args = make_inputs(n, d, fdt=fdt, ddt=ddt, bias_shift=shift)
    check_against_reference("pallas_tpu", args, tiling=tiling, interpret=True)


@pytest.mark.parametrize("impl,tiling", [("pallas_gpu", GpuConfig(block_rows=16)),
                                         ("pallas_tpu", TpuConfig(block_rows=16))])
def test_alpha_zero_is_exact_identity(impl, tiling):
    """g = 0 (alpha = 0, e.g. an alpha warm-up at step 0) returns D bit for bit, like the reference,
    with the reference's gradients (dD' flows to dD only)."""
    args = make_inputs(21, 64, fdt=BF16, ddt=BF16, alpha=0.0)
    y, lg, _ = nag_update(*args, impl=impl, tiling=tiling, interpret=True)
    assert (np.asarray(y) == np.asarray(args[1])).all() and (np.asarray(lg) == 0).all()
    check_against_reference(impl, args, tiling=tiling, interpret=True)


def test_gate_floor_case_really_clamps():
    """The gate-floor case above is only meaningful if some rows sit on the floor and some not."""
    n, d, fdt, ddt, shift, *_ = GATE_FLOOR_CASE
    args = make_inputs(n, d, fdt=fdt, ddt=ddt, bias_shift=shift)
    _, dd, _, _, w, b, logits = args
    pi = jax.nn.softmax(logits)
    mix = jax.nn.sigmoid(dd.astype(F32) @ w.T + b) @ pi
    frac = float(jnp.mean(mix < 1e-6))
    assert 0.05 < frac < 0.95, frac


def test_leading_dims_and_forward_only():
    args = make_inputs(0, 64, lead=(3, 7))
    out = nag_update(*args, impl="pallas_gpu", tiling=GpuConfig(block_rows=16))
    ref = reference.nag_update(*args)
    assert out[0].shape == (3, 7, 64) and out[1].shape == (3, 7) and out[2].shape == (3, 7)
    for a, r in zip(out, ref):
        np.testing.assert_allclose(_f32(a), _f32(r), atol=2e-5, rtol=2e-5)


def test_auto_is_reference_on_cpu_and_float64_falls_back():
    from pallas_kernels.nag_update.ops import resolve_impl

    if jax.default_backend() == "cpu":
        assert resolve_impl("auto", 128) == "reference"
    assert resolve_impl("auto", 128, (jnp.float64,)) == "reference"
    assert resolve_impl("pallas_tpu", 128) == "pallas_tpu"
    with pytest.raises(ValueError):
        resolve_impl("triton", 128)


def _export(fn, platform, *avals):
    from jax import export

    checks = []
    if platform == "cuda":
        from pallas_kernels.nag_update.gpu import pltriton

        target = getattr(pltriton, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
        checks = [export.DisabledSafetyCheck.custom_call(target)]
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*avals)


@pytest.mark.parametrize(
    "impl,platform,n,d,dt,tiling",
    [
        ("pallas_gpu", "cuda", 4099, 768, BF16, None),
        ("pallas_gpu", "cuda", 1000, 1024, F32, GpuConfig(block_rows=16, block_cols=1024)),
        ("pallas_gpu", "cuda", 999, 2048, BF16, GpuConfig(block_rows=32, block_cols=512,
                                                          num_warps=8, fwd_passes=2)),
        ("pallas_tpu", "tpu", 4099, 768, BF16, None),
        ("pallas_tpu", "tpu", 77, 64, F32, TpuConfig(block_rows=16)),
    ],
    ids=["triton-d768-bf16", "triton-d1024-f32-1chunk", "triton-d2048-bf16-2pass",
         "mosaic-d768-bf16", "mosaic-d64-f32"],
)
def test_kernels_lower_for_their_target_on_cpu(impl, platform, n, d, dt, tiling):
    """Forward + backward lower to Triton IR (CUDA) / Mosaic (TPU) without the device."""
    row = jax.ShapeDtypeStruct((n, d), dt)
    s = jax.ShapeDtypeStruct((), F32)
    w = jax.ShapeDtypeStruct((32, d), F32)
    v = jax.ShapeDtypeStruct((32,), F32)

    def loss(*a):
        y, lg, m = nag_update(*a, impl=impl, interpret=False, tiling=tiling)
        return jnp.sum(y.astype(F32)) + jnp.sum(lg) + jnp.sum(m)

    try:
        exp = _export(jax.value_and_grad(loss, argnums=tuple(range(7))), platform,
                      row, row, s, s, w, v, v)
    except ImportError as e:  # a jaxlib built without that backend's bindings
        pytest.skip(f"cannot lower for {platform}: {e}")
    text = exp.mlir_module()
    call = "xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    assert text.count(call) == 2  # one forward, one backward kernel


# ----------------------------------------------------------------------------------------------
# On the real device (compiled, not interpreted)
# ----------------------------------------------------------------------------------------------

DEVICE_CASES = [  # the widths of SHAPES at realistic, ragged token counts
    (333, 64, F32, BF16),
    (4099, 256, BF16, BF16),
    (4099, 768, BF16, BF16),
    (4099, 1024, BF16, BF16),
    (1000, 1024, F32, F32),
    (999, 2048, BF16, F32),
]

GPU_TILINGS = [
    None,  # the tiling table's choice, what `auto` uses
    GpuConfig(block_rows=32, block_cols=128, num_warps=8),
    GpuConfig(block_rows=16, block_cols=256, fwd_passes=2),
]


def _device_check(impl, n, d, fdt, ddt, tiling=None):
    args = make_inputs(n, d, fdt=fdt, ddt=ddt, seed=3)
    with jax.default_matmul_precision("highest"):  # an fp32 reference, not TF32
        check_against_reference(impl, args, tiling=tiling, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("tiling", GPU_TILINGS, ids=["default", "R32-K128-nw8", "2pass"])
@pytest.mark.parametrize("n,d,fdt,ddt", DEVICE_CASES)
def test_gpu_kernel_compiled_matches_reference(n, d, fdt, ddt, tiling):
    _device_check("pallas_gpu", n, d, fdt, ddt, tiling)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_auto_uses_the_kernel_and_single_chunk_rows_compile():
    assert nag_update.__module__.endswith("ops")
    from pallas_kernels.nag_update.ops import resolve_impl

    assert resolve_impl("auto", 1024) == "pallas_gpu"
    _device_check("pallas_gpu", 1000, 1024, BF16, BF16,
                  GpuConfig(block_rows=16, block_cols=1024, num_warps=8))


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("n,d,fdt,ddt", DEVICE_CASES)
def test_tpu_kernel_compiled_matches_reference(n, d, fdt, ddt):
    _device_check("pallas_tpu", n, d, fdt, ddt)


def _load_script(name):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("mod_rate,remat", [(0.0, "none"), (0.5, "full")], ids=["dense", "mod-remat"])
def test_gpu_train_step_has_no_copy_or_transpose_next_to_the_kernel(mod_rate, remat):
    """model.nag.kernel=auto in the compiled train step: the kernels are custom calls, and XLA puts
    no layout copy or transpose on their operands or outputs (benchmarks/kernel_hlo.py lists all
    data movement there; run it at full size for the profile's shape)."""
    kh = _load_script("kernel_hlo")
    hlo = kh.compiled_train_step_hlo(256, 2, 2, 4, 256, 1024, mod_rate=mod_rate, remat=remat)
    assert kh.module_counts(hlo)["custom-call(nag_update)"] >= 4  # fwd + bwd, 2 sublayers
    moves = kh.neighbours(hlo)
    print("\n".join(kh.report(hlo)))
    assert [m for m in moves if m["layout_change"]] == []


def test_hlo_neighbour_scan_finds_a_transpose_before_a_custom_call():
    """benchmarks/kernel_hlo.py's HLO walk, on CPU: a host callback (a custom call) fed a transposed
    array has a copy/transpose operand; fed the array as is, nothing."""
    kh = _load_script("kernel_hlo")

    def step(x, transpose):
        x = x.T if transpose else x
        y = jax.pure_callback(lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(x.shape, F32), x)
        return y + 1

    found = {}
    for t in (True, False):
        hlo = jax.jit(lambda x, t=t: step(x, t)).lower(jnp.ones((4, 3))).compile().as_text()
        found[t] = kh.neighbours(hlo, match=("callback",))
    assert [(m["side"], m["layout_change"]) for m in found[True]] == [("operand", True)]
    assert found[False] == []


def test_benchmark_script_quick_runs(capsys):
    """benchmarks/nag_update.py --quick runs end to end on CPU (correctness + timing table)."""
    mod = _load_script("nag_update")
    assert mod.main(["--quick", "--shapes", "40x64", "--reps", "1", "--inner", "1"]) == 0
    out = capsys.readouterr().out
    assert "copy ceiling" in out and "fwd+bwd" in out and "FAIL" not in out


def test_model_trains_to_the_same_losses_with_the_kernel():
    """model.nag.kernel=pallas (interpret mode on CPU) reproduces the reference training run."""
    import dataclasses

    from flax import nnx

    from nagjax.config import ModelConfig, OptimConfig
    from nagjax.model.residual.nag import NagConfig
    from nagjax.model import build_model
    from nagjax.train import optim
    from nagjax.train.step import init_aux, make_steps

    base = ModelConfig(residual="nag", vocab_size=64, d_model=64, depth=2, n_heads=2, d_ff=64,
                       compute_dtype="float32")
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, 64)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def losses(kernel):
        cfg = base.with_options(NagConfig(kernel=kernel))
        graphdef, params = nnx.split(build_model(cfg), nnx.Param)
        opt = optim.make_optimizer(OptimConfig(warmup_steps=0), 4, params)
        steps = make_steps(graphdef, cfg, opt, optim.schedule(OptimConfig(warmup_steps=0), 4))
        state = {"params": params, "opt_state": opt.init(params), "aux": init_aux(cfg)}
        out = []
        for i in range(3):
            state, metrics = steps.train(state, batch, i)
            out.append(float(metrics["loss"]))
        return out

    np.testing.assert_allclose(losses("pallas"), losses("reference"), rtol=2e-5)


def _pallas_rows(jaxpr):
    """Row counts of the forward kernel calls (pallas_call named nag_update_fwd) in a jaxpr tree."""
    import jax.extend as jex

    rows = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            if "fwd" in str(eqn.params.get("name_and_src_info", eqn.params.get("name", ""))):
                rows.append(eqn.invars[-1].aval.shape[0])  # d2: [N, d]
            continue
        for p in eqn.params.values():
            for q in p if isinstance(p, (list, tuple)) else (p,):
                if isinstance(q, jex.core.ClosedJaxpr):
                    rows += _pallas_rows(q.jaxpr)
                elif isinstance(q, jex.core.Jaxpr):
                    rows += _pallas_rows(q)
    return rows


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_auto_puts_the_kernel_in_the_train_step_on_accelerators(monkeypatch, platform, remat):
    """model.nag.kernel=auto (the default): the traced train step holds the Pallas kernel on GPU
    and TPU (platform faked; tracing only) and none on CPU. With Mixture-of-Depths (top-k, the first
    block dense) the routed block's kernel sees only the kept tokens: b x k rows, not b x T."""
    from nagjax.config import Config, DataConfig, ModConfig, ModelConfig, OptimConfig, TrainConfig
    from nagjax.model.mod import kept_tokens
    from nagjax.train.state import training_state
    from pallas_kernels.nag_update import ops

    monkeypatch.setattr(ops, "platform", lambda: platform)
    b, t = 2, 16
    model = ModelConfig(residual="nag", vocab_size=64, d_model=64, depth=2, n_heads=2, d_ff=64,
                        compute_dtype="bfloat16", remat=remat)
    assert model.nag.kernel == "auto"
    config = Config(model=model, mod=ModConfig(rate=0.5), data=DataConfig(seq_len=t, batch_size=b),
                    optim=OptimConfig(), train=TrainConfig(steps=10)).validate()
    spec = training_state(config)
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    jaxpr = jax.make_jaxpr(spec.steps.train)(spec.abstract, {"inputs": tokens, "targets": tokens},
                                             jnp.int32(1))
    rows = _pallas_rows(jaxpr.jaxpr)
    if platform == "cpu":
        assert rows == []
    else:  # one scan body per segment (dense block 0, routed block 1), two sublayers each
        assert sorted(set(rows)) == [b * kept_tokens(t, 0.5), b * t] and len(rows) >= 4
