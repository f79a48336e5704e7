"""Tests for medseg_jax.models: shapes, dtypes, BatchNorm state, errors, FCN upsampling, attention.

Compiling a threefry-keyed init is slow on CPU (seconds per model), so the tests initialise
with an "rbg" key and share one set of variables per (model, dims).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from medseg_jax.models import MODELS, attention_maps, count_params, create_model, init_model, layers
from medseg_jax.models.fcn import BilinearUpsample, bilinear_kernel

NAMES = sorted(MODELS)
SHAPES = {2: (2, 16, 16, 1), 3: (2, 8, 8, 8, 1)}


def tiny(name: str, dims: int, **kwargs):
    depth = 4 if name == "fcn" else 3  # FCN needs depth >= 3; 4 exercises its final upsampling
    kwargs = {"num_classes": 3, "spatial_dims": dims, "base_features": 4, "depth": depth, **kwargs}
    return create_model(name, **kwargs)


def inputs(dims: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), SHAPES[dims])


def init_key() -> jax.Array:
    return jax.random.key(0, impl="rbg")


@functools.cache
def tiny_variables(name: str, dims: int) -> dict:
    """Variables of ``tiny(name, dims)``; valid for any dtype/dropout_rate of that model."""
    return init_model(tiny(name, dims), init_key(), SHAPES[dims])


def abstract_init(model, shape: tuple[int, ...]):
    """Variable shapes without computing anything."""
    return jax.eval_shape(lambda: model.init(init_key(), jnp.zeros(shape), train=False))


def apply_fn(model, **kwargs):
    return jax.jit(functools.partial(model.apply, **kwargs))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_batch_stats(name, dims):
    model = tiny(name, dims)
    x = inputs(dims)
    variables = tiny_variables(name, dims)
    assert set(variables) == {"params", "batch_stats"}

    logits = apply_fn(model, train=False)(variables, x)  # no mutable collection needed
    assert logits.shape == x.shape[:-1] + (3,)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()

    out, state = apply_fn(model, train=True, mutable=["batch_stats"])(variables, x)
    assert out.shape == logits.shape and out.dtype == jnp.float32
    old = jax.tree_util.tree_leaves(variables["batch_stats"])
    new = jax.tree_util.tree_leaves(state["batch_stats"])
    assert len(old) == len(new)
    assert all(not np.allclose(a, b) for a, b in zip(old, new))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite(name):
    model = tiny(name, 2)
    x = inputs(2)
    variables = tiny_variables(name, 2)

    @jax.jit
    def grad_fn(params):
        def loss_fn(p):
            out, _ = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean(out**2)

        return jax.value_and_grad(loss_fn)(params)

    loss, grads = grad_fn(variables["params"])
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_compute_gives_float32_logits(name):
    model = tiny(name, 2, dtype=jnp.bfloat16)
    x = inputs(2)
    variables = tiny_variables(name, 2)
    shapes = jax.eval_shape(lambda: model.init(init_key(), x, train=False))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes["params"]))
    logits = apply_fn(model, train=False)(variables, x)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    reference = apply_fn(tiny(name, 2), train=False)(variables, x)
    np.testing.assert_allclose(logits, reference, atol=0.1 * float(jnp.abs(reference).max()) + 1e-3)


@pytest.mark.parametrize("norm", ["instance", "none"])
def test_other_norms_have_no_batch_stats(norm):
    model = tiny("unet", 2, norm=norm)
    x = inputs(2)
    # init_model also takes (*spatial, C).
    shapes = jax.eval_shape(lambda: init_model(model, init_key(), x.shape[1:]))
    assert set(shapes) == {"params"}
    # Random values in place of a real init: it would cost seconds of compilation here.
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: 0.3 * rng.standard_normal(s.shape, np.float32), shapes
    )
    out = apply_fn(model, train=True)(variables, x)
    assert out.shape == x.shape[:-1] + (3,)
    assert np.isfinite(np.asarray(out)).all()


def test_unet_reference_parameter_count():
    model = create_model(
        "unet", num_classes=2, spatial_dims=2, base_features=32, depth=4, norm="batch"
    )
    shapes = abstract_init(model, (1, 64, 64, 1))
    n = count_params(shapes["params"])
    assert abs(n - 1.93e6) / 1.93e6 < 0.01, n
    assert count_params(shapes) == n  # a full variables dict counts its params only


@pytest.mark.parametrize("name", NAMES)
def test_indivisible_shape_error(name):
    model = create_model(name, num_classes=2, depth=4)
    msg = f"{name} with depth=4 needs spatial sizes divisible by 8, got (30, 64)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        abstract_init(model, (1, 30, 64, 1))


def test_wrong_rank_error():
    model = create_model("unet", num_classes=2, spatial_dims=3)
    with pytest.raises(ValueError, match="spatial_dims=3"):
        abstract_init(model, (1, 16, 16, 1))


def test_unknown_model_error():
    msg = "unknown model 'xyz'; valid models: attention_unet, fcn, resenc_unet, unet"
    with pytest.raises(ValueError, match=re.escape(msg)):
        create_model("xyz", num_classes=2)


def test_fcn_needs_depth_3():
    model = create_model("fcn", num_classes=2, depth=2)
    with pytest.raises(ValueError, match="depth >= 3"):
        abstract_init(model, (1, 16, 16, 1))


@pytest.mark.parametrize("dims,factor", [(2, 2), (2, 4), (3, 2)])
def test_bilinear_upsample_init(dims, factor):
    n = 8
    module = BilinearUpsample(factor, dims)
    const = jnp.full((1,) + (n,) * dims + (2,), 3.0)
    variables = module.init(jax.random.key(0), const)
    out = module.apply(variables, const)
    assert out.shape == (1,) + (n * factor,) * dims + (2,)
    interior = (slice(None),) + (slice(factor, -factor),) * dims
    np.testing.assert_allclose(out[interior], 3.0, rtol=1e-6)
    # A random map matches (bi/tri)linear resizing away from the zero-padded border.
    x = jax.random.normal(jax.random.key(1), const.shape)
    ref = jax.image.resize(x, out.shape, method="linear")
    np.testing.assert_allclose(module.apply(variables, x)[interior], ref[interior], atol=1e-5)


def test_fcn_upsampling_kernels_are_bilinear():
    params = tiny_variables("fcn", 2)["params"]  # depth 4: two 2x fusions, then a final 2x
    for key in ("upscore_2", "upscore_1", "upscore_final"):
        kernel = params[key]["ConvTranspose_0"]["kernel"]
        np.testing.assert_allclose(kernel, bilinear_kernel(2, 2, 3))


def test_fcn_dropout_needs_rng_only_in_training():
    model = tiny("fcn", 2, dropout_rate=0.5)
    x = inputs(2)
    variables = tiny_variables("fcn", 2)
    eval_fn = apply_fn(model, train=False)
    np.testing.assert_array_equal(eval_fn(variables, x), eval_fn(variables, x))

    @jax.jit
    def train_fn(v, x, key):
        return model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})[0]

    a = train_fn(variables, x, jax.random.key(1))
    b = train_fn(variables, x, jax.random.key(2))
    assert a.shape == x.shape[:-1] + (3,)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("dims", [2, 3])
def test_attention_maps(dims):
    model = tiny("attention_unet", dims)
    x = inputs(dims)
    variables = tiny_variables("attention_unet", dims)
    maps = jax.jit(functools.partial(attention_maps, model))(variables, x)
    assert sorted(maps) == ["attention_0", "attention_1"]
    for level in (0, 1):
        alpha = maps[f"attention_{level}"]
        spatial = tuple(s // 2**level for s in x.shape[1:-1])
        assert alpha.shape == (x.shape[0],) + spatial + (1,)
        assert alpha.dtype == jnp.float32
        assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0


@pytest.mark.parametrize("dims", [2, 3])
def test_up_conv_is_the_transposed_convolution(dims):
    """layers.UpConv (a matmul + reshape) = nn.ConvTranspose(k=2, s=2): same parameters
    from the same key, same outputs and input gradients."""
    x = jax.random.normal(jax.random.key(1), (2,) + (4,) * dims + (3,))
    ref = nn.ConvTranspose(5, (2,) * dims, strides=(2,) * dims, padding="VALID")
    new = layers.UpConv(5, dims)
    v_ref, v_new = ref.init(jax.random.key(2), x), new.init(jax.random.key(2), x)
    assert jax.tree.structure(v_ref) == jax.tree.structure(v_new)
    for a, b in zip(jax.tree.leaves(v_ref), jax.tree.leaves(v_new)):
        np.testing.assert_array_equal(a, b)
    v_ref = jax.tree.map(lambda a: a + 0.1, v_ref)  # a non-zero bias too
    np.testing.assert_allclose(new.apply(v_ref, x), ref.apply(v_ref, x), rtol=1e-5, atol=1e-6)
    g_ref = jax.grad(lambda v, x: (ref.apply(v, x) ** 2).sum(), (0, 1))(v_ref, x)
    g_new = jax.grad(lambda v, x: (new.apply(v, x) ** 2).sum(), (0, 1))(v_ref, x)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_new)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_max_pool_and_its_gradient_match_nn_max_pool(dims):
    """Including ties (ReLU zeros, equal maxima): the gradient goes to the first maximum
    of each window, as XLA's select-and-scatter does."""
    x = np.maximum(np.random.default_rng(0).normal(size=(2,) + (6,) * dims + (3,)), 0)
    x[(0,) + (0,) * dims] = x[(0,) + (1,) * dims] = 2.0  # a positive tie in one window
    x = jnp.asarray(x, jnp.float32)
    ref = lambda x: nn.max_pool(x, (2,) * dims, strides=(2,) * dims)  # noqa: E731
    new = lambda x: layers.max_pool(x, dims)  # noqa: E731
    np.testing.assert_array_equal(new(x), ref(x))
    g = jax.random.normal(jax.random.key(0), ref(x).shape)
    np.testing.assert_array_equal(jax.vjp(new, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0])


@pytest.mark.parametrize("name", ["unet", "resenc_unet"])
def test_remat_gives_the_same_gradients_and_keeps_fewer_activations(name):
    """nn.remat'd encoder blocks: same parameters and gradients; the activations kept for
    the backward pass (the residuals of jax.vjp) shrink. (XLA's CPU backend drops the
    optimisation barriers and merges the recomputation back, so on CPU the compiled
    program's memory does not change; GPU/TPU keep it.)"""
    x = inputs(3)
    plain, remat = tiny(name, 3), tiny(name, 3, remat=True)
    variables = tiny_variables(name, 3)
    assert jax.tree.structure(abstract_init(remat, x.shape)) == jax.tree.structure(variables)

    def loss(model):
        def fn(params):
            out, _ = model.apply({**variables, "params": params}, x, train=True,
                                 mutable=["batch_stats"])
            return (out ** 2).mean()
        return fn

    for a, b in zip(jax.tree.leaves(jax.grad(loss(plain))(variables["params"])),
                    jax.tree.leaves(jax.grad(loss(remat))(variables["params"]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    kept = [sum(leaf.nbytes for leaf in jax.tree.leaves(jax.vjp(loss(m), variables["params"])[1]))
            for m in (plain, remat)]
    assert kept[1] < 0.75 * kept[0], kept


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_runs_the_convolutions_in_bfloat16(name):
    """Mixed precision: float32 parameters in, bfloat16 convolutions and matmuls."""
    model = tiny(name, 2, dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        tiny_variables(name, 2), inputs(2))
    ops = [e for e in _all_eqns(jaxpr.jaxpr)
           if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert ops and all(v.aval.dtype == jnp.bfloat16 for e in ops for v in e.invars)


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            inner = p if hasattr(p, "eqns") else getattr(p, "jaxpr", None)
            if hasattr(inner, "eqns"):
                yield from _all_eqns(inner)


# --------------------------------------------------------------------------- #
# Per-axis geometry, layer formulations, deep supervision, config building
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("factors", [(2, 2), (2, 1), (1, 2, 2), (2, 2, 2)])
def test_layer_impls_give_the_same_values_and_gradients(factors):
    """layer_impl="reshape" (matmul + depth-to-space, reshape pool) and "lax"
    (lax.conv_transpose, reduce_window): same parameters, outputs and gradients."""
    dims = len(factors)
    x = jax.random.normal(jax.random.key(1), (2,) + (4,) * dims + (3,))
    up = {impl: layers.UpConv(5, dims, factors=factors, impl=impl) for impl in ("reshape", "lax")}
    v = up["reshape"].init(jax.random.key(2), x)
    assert jax.tree.structure(v) == jax.tree.structure(up["lax"].init(jax.random.key(2), x))
    v = jax.tree.map(lambda a: a + 0.1, v)
    outs = {k: m.apply(v, x) for k, m in up.items()}
    assert outs["lax"].shape == (2, *(4 * f for f in factors), 5)
    np.testing.assert_allclose(outs["reshape"], outs["lax"], rtol=1e-5, atol=1e-6)
    grads = {k: jax.grad(lambda v, x, m=m: (m.apply(v, x) ** 2).sum(), (0, 1))(v, x)
             for k, m in up.items()}
    for a, b in zip(jax.tree.leaves(grads["reshape"]), jax.tree.leaves(grads["lax"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    xp = np.maximum(np.random.default_rng(0).normal(size=(2,) + (4,) * dims + (3,)), 0)
    xp = jnp.asarray(xp, jnp.float32)  # ReLU zeros: ties inside windows
    pool = {impl: functools.partial(layers.max_pool, spatial_dims=dims, factors=factors,
                                    impl=impl) for impl in ("reshape", "lax")}
    np.testing.assert_array_equal(pool["reshape"](xp), pool["lax"](xp))
    g = jax.random.normal(jax.random.key(0), pool["lax"](xp).shape)
    np.testing.assert_array_equal(jax.vjp(pool["reshape"], xp)[1](g)[0],
                                  jax.vjp(pool["lax"], xp)[1](g)[0])


def test_auto_layer_impl_is_the_cpu_form_here():
    assert layers.resolve_impl("auto", "up_conv") == layers.AUTO_IMPL["cpu"]["up_conv"]
    assert layers.resolve_impl("lax", "max_pool") == "lax"
    with pytest.raises(ValueError, match="layer_impl must be one of auto, reshape, lax"):
        layers.resolve_impl("cudnn", "max_pool")


@pytest.mark.parametrize("name", NAMES)
def test_models_agree_across_layer_impls(name):
    x = inputs(3)
    variables = tiny_variables(name, 3)
    out = {impl: apply_fn(tiny(name, 3, layer_impl=impl), train=False)(variables, x)
           for impl in ("reshape", "lax")}
    np.testing.assert_allclose(out["reshape"], out["lax"], rtol=1e-4, atol=1e-5)


def _at(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


ANISO = {"pool_sizes": ((2, 2, 1), (2, 2, 2)), "kernel_sizes": ((3, 3, 1), (3, 3, 3), (3, 3, 3))}


@pytest.mark.parametrize("name", NAMES)
def test_per_axis_pooling_and_kernels(name):
    """Thick slices: the third axis is pooled once (not twice) and convolved with kernel 1
    at the first level; shapes, kernels and the divisibility check follow the geometry."""
    depth = 3
    model = create_model(name, num_classes=3, spatial_dims=3, base_features=4, depth=depth,
                         **ANISO)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 2, 1))  # z = 2 = its total pooling
    shapes = abstract_init(model, x.shape)
    first, second = (("stem", "block_0/conv_1") if name == "resenc_unet" else
                     ("Conv_0", "Conv_0"))
    assert _at(shapes["params"]["enc_0"], first)["kernel"].shape == (3, 3, 1, 1, 4)
    assert _at(shapes["params"]["enc_1"], second)["kernel"].shape == (3, 3, 3, 4, 8)
    if name != "fcn":
        assert shapes["params"]["up_0"]["kernel"].shape == (2, 2, 1, 8, 4)
    variables = init_model(model, init_key(), x.shape)
    logits = apply_fn(model, train=False)(variables, x)
    assert logits.shape == x.shape[:-1] + (3,)
    assert np.isfinite(np.asarray(logits)).all()
    with pytest.raises(ValueError, match=re.escape("divisible by (4, 4, 2), got (8, 8, 3)")):
        abstract_init(model, (1, 8, 8, 3, 1))


def test_geometry_errors_name_the_field():
    with pytest.raises(ValueError, match="pool_sizes has 1 levels; depth=3 needs 2"):
        layers.level_geometry("unet", 2, 3, ((2, 2),))
    with pytest.raises(ValueError, match="kernel_sizes has 2 levels; depth=3 needs 3"):
        layers.level_geometry("unet", 2, 3, (), ((3, 3), (3, 3)))
    with pytest.raises(ValueError, match="has 3 entries for 2 spatial axes"):
        layers.level_geometry("unet", 2, 2, ((2, 2, 2),))


@pytest.mark.parametrize("name", NAMES)
def test_deep_supervision_sows_coarser_logits(name):
    model = tiny(name, 2, deep_supervision=True)
    x = inputs(2)
    variables = init_model(model, init_key(), x.shape)
    logits, state = apply_fn(model, train=True, mutable=["batch_stats", "aux"])(variables, x)
    aux = {k: v[-1] for k, v in state["aux"].items()}
    depth = model.depth
    levels = sorted(int(k.split("_")[1]) for k in aux)
    # U-Nets: every decoder level but the finest (the output) and the bottleneck; FCN:
    # its score maps at the three coarsest levels that are not the output's.
    expected = list(range(1, depth - 1)) if name != "fcn" else list(range(1, depth))
    assert levels == expected
    for level in levels:
        assert aux[f"level_{level}"].shape == (x.shape[0], *(s // 2**level for s in
                                                             x.shape[1:-1]), 3)
    plain = apply_fn(model, train=False)(variables, x)  # eval: logits only, no aux needed
    assert plain.shape == logits.shape


def test_from_config_refuses_unknown_fields_and_builds_every_field():
    from medseg_jax import models

    section = {"name": "fcn", "spatial_dims": 2, "base_features": 4, "depth": 3,
               "dtype": "bfloat16", "dropout_rate": 0.3, "pool_sizes": [[2, 2], [2, 1]]}
    model = models.from_config(section, num_classes=2)
    assert model.dropout_rate == 0.3 and model.dtype == jnp.bfloat16
    assert model.pool_sizes == ((2, 2), (2, 1))
    with pytest.raises(ValueError, match=re.escape(
            "config.model.output_transform: fcn has no field 'output_transform'; valid: name, ")):
        models.from_config({"name": "fcn", "output_transform": True}, num_classes=2)
    assert "output_transform" in models.model_fields("attention_unet")
    assert models.extra_fields("fcn") == {"dropout_rate": 0.0}


def test_figure_maps_come_from_the_model():
    from medseg_jax import models

    x = inputs(2)
    maps = models.figure_maps(tiny("attention_unet", 2), tiny_variables("attention_unet", 2), x)
    assert list(maps) == ["attention: finest gate"]
    assert maps["attention: finest gate"].shape == x.shape[:-1] + (1,)
    assert models.figure_maps(tiny("unet", 2), tiny_variables("unet", 2), x) == {}


# Parameter counts of the Models table in docs/training.md (default config: base 16, depth 4, 2D;
# and base 32, depth 4, 2D / 3D), two classes.
PARAMS = {("unet", 16, 2): 482_466, ("fcn", 16, 2): 656_086,
          ("attention_unet", 16, 2): 496_245,
          ("unet", 32, 2): 1_926_466, ("fcn", 32, 2): 2_618_086,
          ("attention_unet", 32, 2): 1_980_901,
          ("unet", 32, 3): 5_601_154, ("fcn", 32, 3): 7_319_398,
          ("attention_unet", 32, 3): 5_655_589,
          ("resenc_unet", 16, 2): 2_183_586, ("resenc_unet", 32, 2): 8_723_266,
          ("resenc_unet", 32, 3): 25_890_178}


@pytest.mark.parametrize("name,base,dims", sorted(PARAMS))
def test_exact_parameter_counts(name, base, dims):
    model = create_model(name, num_classes=2, spatial_dims=dims, base_features=base, depth=4)
    shape = (1,) + (16,) * dims + (1,)
    assert count_params(abstract_init(model, shape)["params"]) == PARAMS[name, base, dims]


# --- residual-encoder U-Net ------------------------------------------------------------

def _block_params(block, shape) -> dict:
    return abstract_init(block, shape)["params"]


def test_resenc_block_parameter_count_by_hand():
    """BasicBlockD, 2D, kernel 3, batch norm (no conv bias): two 3x3 convs and two norms
    (scale + bias); a shape change adds a 1x1 conv and its norm."""
    from medseg_jax.models.resenc_unet import ResBlock

    same = ResBlock(4, 2)  # 4 -> 4 features, stride 1: identity skip
    assert count_params(_block_params(same, (1, 8, 8, 4))) == 2 * (9 * 4 * 4) + 2 * (2 * 4)
    down = ResBlock(4, 2, strides=(2, 2))  # 2 -> 4 features, stride 2: pooled, projected
    params = _block_params(down, (1, 8, 8, 2))
    assert set(params) == {"conv_1", "norm_1", "conv_2", "norm_2", "skip_conv", "skip_norm"}
    assert count_params(params) == (9 * 2 * 4 + 8) + (9 * 4 * 4 + 8) + (1 * 2 * 4 + 8)
    # norm "none": biases instead of the norms' scale and bias
    bare = ResBlock(4, 2, norm="none", strides=(2, 2))
    assert count_params(_block_params(bare, (1, 8, 8, 2))) == (
        (9 * 2 * 4 + 4) + (9 * 4 * 4 + 4) + (2 * 4 + 4))
    y = jax.eval_shape(lambda: down.init_with_output(init_key(), jnp.zeros((2, 8, 8, 2)),
                                                     train=False)[0])
    assert y.shape == (2, 4, 4, 4)


def test_resenc_one_stage_one_block_network_by_hand():
    """depth 1, one block: stem conv (9*1*4) + norm (8), the block (2 * (9*4*4 + 8)),
    the 1x1 head (4*3 + 3) = 363."""
    model = create_model("resenc_unet", num_classes=3, base_features=4, depth=1,
                         blocks_per_stage=(1,))
    params = abstract_init(model, (1, 8, 8, 1))["params"]
    assert set(params) == {"enc_0", "head"}
    assert set(params["enc_0"]) == {"stem", "stem_norm", "block_0"}
    assert count_params(params) == (9 * 4 + 8) + 2 * (9 * 4 * 4 + 8) + (4 * 3 + 3) == 363


@pytest.mark.parametrize("dims", [2, 3])
def test_resenc_skip_path_pools_and_projects(dims):
    """At initialisation the last norm of the residual branch has scale 0 (nnU-Net's
    init), so the block is its skip path: ReLU(norm(1x1 conv(avg pool(x)))); with that
    scale set, the residual branch adds to it."""
    from medseg_jax.models.resenc_unet import ResBlock

    block = ResBlock(4, dims, strides=(2,) * dims)
    x = jax.random.normal(jax.random.key(1), (2,) + (8,) * dims + (3,))
    variables = block.init(init_key(), x, train=False)
    p = variables["params"]
    assert not np.asarray(p["norm_2"]["scale"]).any()
    pooled = x.reshape((2,) + (4, 2) * dims + (3,)).mean(axis=tuple(range(2, 2 * dims + 1, 2)))
    projected = pooled @ p["skip_conv"]["kernel"].reshape(3, 4)
    expected = nn.relu(projected / np.sqrt(1 + 1e-5) * p["skip_norm"]["scale"]
                       + p["skip_norm"]["bias"])
    out = block.apply(variables, x, train=False)
    assert out.shape == (2,) + (4,) * dims + (4,)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    p = {**p, "norm_2": {**p["norm_2"], "scale": jnp.ones(4)}}
    moved = block.apply({**variables, "params": p}, x, train=False)
    assert np.abs(np.asarray(moved - out)).max() > 1e-2


def test_resenc_identity_skip_keeps_the_input():
    """Same grid and features: the skip is the identity (no skip parameters); at
    initialisation the block gives ReLU(x)."""
    from medseg_jax.models.resenc_unet import ResBlock

    block = ResBlock(3, 2)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    variables = block.init(init_key(), x, train=False)
    assert "skip_conv" not in variables["params"]
    np.testing.assert_allclose(block.apply(variables, x, train=False), nn.relu(x), atol=1e-6)


def test_resenc_blocks_per_stage_and_decoder_convs():
    from medseg_jax.models.resenc_unet import blocks_per_level

    assert blocks_per_level((), 6) == [1, 3, 4, 6, 6, 6]  # nnU-Net's ResEnc presets
    assert blocks_per_level((), 2) == [1, 3]
    assert blocks_per_level((2,), 3) == [2, 2, 2]
    assert blocks_per_level((1, 2, 3, 4, 5), 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="blocks_per_stage entries must be >= 1"):
        blocks_per_level((1, 0), 3)
    model = create_model("resenc_unet", num_classes=2, base_features=4, depth=4)
    params = abstract_init(model, (1, 16, 16, 1))["params"]
    blocks = [sum(k.startswith("block_") for k in params[f"enc_{i}"]) for i in range(4)]
    assert blocks == [1, 3, 4, 6]
    assert [sum(k.startswith("Conv") for k in params[f"dec_{i}"]) for i in range(3)] == [1] * 3
    # strided first block: stride by the pooling factor, kernel by the level's
    assert params["enc_1"]["block_0"]["conv_1"]["kernel"].shape == (3, 3, 4, 8)
    two = create_model("resenc_unet", num_classes=2, base_features=4, depth=2,
                       blocks_per_stage=(2,), decoder_convs=2)
    params = abstract_init(two, (1, 16, 16, 1))["params"]
    assert [len([k for k in params[f"enc_{i}"] if k.startswith("block_")])
            for i in range(2)] == [2, 2]
    assert sorted(k for k in params["dec_0"] if k.startswith("Conv")) == ["Conv_0", "Conv_1"]
    with pytest.raises(ValueError, match="decoder_convs must be >= 1"):
        abstract_init(create_model("resenc_unet", num_classes=2, decoder_convs=0),
                      (1, 16, 16, 1))


def test_resenc_config_fields_are_validated():
    from medseg_jax import config as config_lib
    from medseg_jax import models

    assert models.extra_fields("resenc_unet") == {"blocks_per_stage": (), "decoder_convs": 1}
    config = config_lib.default_config()
    config.model.name = "resenc_unet"
    config.model.blocks_per_stage = (1, 2, 2, 3)
    config.model.decoder_convs = 1
    config_lib.validate(config)
    for field, value, message in [
            ("blocks_per_stage", (1, 0), "config.model.blocks_per_stage: entry 0: must be >= 1"),
            ("blocks_per_stage", 3, "config.model.blocks_per_stage: must be a tuple of numbers"),
            ("decoder_convs", 0, "config.model.decoder_convs: must be >= 1, got 0"),
            ("dropout_rate", 0.1, "config.model.dropout_rate: config.model has no field "
                                  "'dropout_rate'; a field of model fcn")]:
        bad = config_lib.default_config()
        bad.model.name = "resenc_unet"
        bad.model[field] = value
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            config_lib.validate(bad)
    built = models.from_config({"name": "resenc_unet", "blocks_per_stage": [1, 2],
                                "decoder_convs": 2}, num_classes=2)
    assert built.blocks_per_stage == (1, 2) and built.decoder_convs == 2


def test_resenc_3d_config_file_selects_it():
    import runpy
    from pathlib import Path

    from medseg_jax.config import check_numbers
    from medseg_jax.config_fields import meanings

    path = Path(__file__).resolve().parents[1] / "configs" / "resenc_unet_3d.py"
    config = runpy.run_path(str(path))["get_config"]()
    assert (config.model.name, config.model.spatial_dims) == ("resenc_unet", 3)
    assert config.data.plan == "auto" and config.model.deep_supervision
    check_numbers(config)
    assert "(1, 3, 4, 6, 6, ...)" in meanings()["model.blocks_per_stage"]


@pytest.mark.parametrize("dims", [2, 3])
def test_resenc_training_step_runs(dims):
    """One jitted SGD step of the ResEnc U-Net with deep supervision, as the train step
    calls it: finite loss, every parameter gets a gradient, the loss goes down."""
    import optax

    from medseg_jax import losses

    model = tiny("resenc_unet", dims, deep_supervision=True)
    x = inputs(dims)
    labels = (x[..., 0] > 0).astype(jnp.int32) + (x[..., 0] > 1).astype(jnp.int32)
    variables = init_model(model, init_key(), x.shape)
    tx = optax.sgd(0.05, momentum=0.9)

    @jax.jit
    def step(params, batch_stats, opt_state):
        def loss_fn(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats", "aux"])
            aux = {int(k.split("_")[1]): v[-1] for k, v in updates["aux"].items()}
            return losses.supervised_loss(logits, labels, 3, aux=aux), updates
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        changes, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, changes), updates["batch_stats"], opt_state, \
            loss, grads

    params, stats, opt = variables["params"], variables["batch_stats"], None
    opt = tx.init(params)
    first = None
    for _ in range(4):
        params, stats, opt, loss, grads = step(params, stats, opt)
        assert np.isfinite(float(loss))
        first = float(loss) if first is None else first
    assert float(loss) < first
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_resenc_strided_conv_is_centred_as_nnunets():
    """The down-sampling convolution samples the stride-1 convolution at even positions
    (PyTorch's padding kernel // 2), not at odd ones ("SAME" with stride 2 would)."""
    from medseg_jax.models.resenc_unet import ResBlock

    block = ResBlock(4, 2, strides=(2, 2))
    x = jax.random.normal(jax.random.key(3), (1, 8, 8, 2))
    variables = block.init(init_key(), x, train=False)
    _, state = block.apply(variables, x, train=False, capture_intermediates=True)
    strided = state["intermediates"]["conv_1"]["__call__"][0]
    full = nn.Conv(4, (3, 3), padding="SAME", use_bias=False).apply(
        {"params": variables["params"]["conv_1"]}, x)
    np.testing.assert_allclose(strided, full[:, ::2, ::2], rtol=1e-5, atol=1e-5)
