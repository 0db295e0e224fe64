"""Tests of kits_keras/model/unet.py and kits_keras/model/layers.py."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from kits_keras.config import get_config
from kits_keras.model.regions import num_outputs
from kits_keras.model.strides import output_strides
from kits_keras.config import override
from kits_keras.model.layers import InstanceNormalization
from kits_keras.model.unet import build_unet
from kits_keras.model.unet import count_flops
from kits_keras.model.unet import full_resolution_model
from kits_keras.model.unet import level_filters
from kits_keras.model.unet import total_stride

# The strides of the PlainConvUNet measured in benchmarks/train_step.py.
PEER_STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    cfg = get_config("tiny")
    return cfg, build_unet(cfg)


def test_tiny_outputs_per_decoder_level(tiny):
    cfg, model = tiny
    x = np.random.default_rng(0).normal(size=(2, 16, 32, 32, 1))
    outs = model(x.astype("float32"))
    factors = output_strides(cfg)
    assert len(outs) == len(factors) == cfg.model.num_levels - 1
    for out, f in zip(outs, factors):
        assert tuple(out.shape) == (2, 16 // f[0], 32 // f[1], 32 // f[2],
                                    num_outputs(cfg.model,
                                                cfg.data.label_set))
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        out = np.asarray(out)
        assert cfg.model.output_mode == "regions"  # sigmoids, not softmax
        assert np.all(out >= 0) and np.all(out <= 1)
        assert np.ptp(out.sum(-1)) > 0.01


def test_layer_names_by_level(tiny):
    _, model = tiny
    names = {layer.name for layer in model.layers}
    for name in ["enc0_conv1", "enc2_conv1_norm", "enc3_conv2_norm",
                 "dec1_up", "dec0_concat", "dec2_conv2", "head0",
                 "head0_conv", "head2"]:
        assert name in names, name
    assert model.output_names == ["head0", "head1", "head2"]
    stride = model.get_layer("enc1_conv1").strides
    assert tuple(stride) == (2, 2, 2)
    assert tuple(model.get_layer("enc1_conv2").strides) == (1, 1, 1)


def test_paper_shapes_match_plainconvunet():
    cfg = override(get_config("paper"), model={"strides": PEER_STRIDES})
    model = build_unet(cfg)
    # dynamic_network_architectures' PlainConvUNet with these settings has
    # exactly this many parameters (benchmarks/train_step.py prints both).
    assert model.count_params() == 14_733_342
    assert level_filters(cfg.model) == (30, 60, 120, 240, 320)
    assert total_stride(cfg) == (4, 16, 16)
    paper = get_config("paper")
    assert total_stride(paper) == (8, 16, 16)
    assert len(output_strides(paper)) == 4


def test_full_resolution_model_shares_weights(tiny):
    _, model = tiny
    single = full_resolution_model(model)
    x = np.random.default_rng(1).normal(size=(1, 8, 16, 16, 1))
    x = x.astype("float32")
    np.testing.assert_allclose(
        np.asarray(single(x)), np.asarray(model(x)[0]), rtol=1e-5, atol=1e-6
    )
    assert single.count_params() < model.count_params()
    head = model.get_layer("head0_conv")
    assert single.get_layer("head0_conv") is head


def test_save_load_round_trip(tiny, tmp_path):
    _, model = tiny
    path = str(tmp_path / "m.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    x = np.random.default_rng(2).normal(size=(1, 8, 16, 16, 1))
    x = x.astype("float32")
    for a, b in zip(model(x), restored(x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_invalid_strides():
    cfg = override(get_config("tiny"), model={"strides": ((2, 2, 2),) * 4})
    with pytest.raises(ValueError, match="strides"):
        build_unet(cfg)
    with pytest.raises(ValueError, match="norm"):
        build_unet(override(get_config("tiny"), model={"norm": "layer"}))


def test_instance_norm_matches_group_norm():
    x = np.random.default_rng(3).normal(2.0, 3.0, (2, 6, 5, 4, 7))
    x = x.astype("float32")
    ours = InstanceNormalization()
    ref = keras.layers.GroupNormalization(groups=-1, epsilon=1e-5)
    np.testing.assert_allclose(
        np.asarray(ours(x)), np.asarray(ref(x)), atol=1e-5
    )
    restored = InstanceNormalization.from_config(ours.get_config())
    assert restored.epsilon == ours.epsilon
    with pytest.raises(ValueError):
        InstanceNormalization(epsilon=0.0)


FUSED_GRADIENT_CHECK = """
import numpy as np
import keras
from keras import ops
from kits_keras.model.layers import instance_norm_leaky_relu
from kits_keras.model.fusion import xla_fuser

rng = np.random.default_rng(0)
x = rng.normal(2.0, 3.0, (2, 6, 5, 4, 7)).astype("float32")
# Negative gammas and a shift put voxels on both sides of the kink.
gamma = rng.normal(0.5, 1.0, 7).astype("float32")
beta = rng.normal(0.0, 0.5, 7).astype("float32")
w = rng.normal(size=x.shape).astype("float32")


def reference(x, gamma, beta):  # the unfused expression, autodiffed
    mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
    var = ops.var(x, axis=(1, 2, 3), keepdims=True)
    z = (x - mean) / ops.sqrt(var + 1e-5) * gamma + beta
    return ops.leaky_relu(z, 0.01)


# On TensorFlow the layer compiles the forward and backward pass with XLA
# while training: check that variant too.
FUSE = xla_fuser()


def fused(x, gamma, beta, fuse=None):
    return instance_norm_leaky_relu(x, gamma, beta, 1e-5, 0.01, fuse=fuse)


def value_and_grads(f, graph):
    if keras.backend.backend() == "jax":
        import jax
        loss = lambda *a: (f(*a) * w).sum()
        step = jax.jit(jax.value_and_grad(loss, (0, 1, 2))) if graph else (
            jax.value_and_grad(loss, (0, 1, 2)))
        value, grads = step(x, gamma, beta)
        return f(x, gamma, beta), grads
    import tensorflow as tf

    def step(*args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            y = f(*args)
            loss = tf.reduce_sum(y * w)
        return y, tape.gradient(loss, args)

    if graph:  # as Keras traces it: spatial sizes unknown
        spec = tf.TensorSpec([None, None, None, None, 7])
        step = tf.function(step, input_signature=[
            spec, tf.TensorSpec([7]), tf.TensorSpec([7])])
    return step(*[tf.constant(a) for a in (x, gamma, beta)])


assert (FUSE is None) == (keras.backend.backend() != "tensorflow")
for fuse in {None, FUSE}:
    for graph in (False, True):
        y_ref, g_ref = value_and_grads(reference, graph)
        y, g = value_and_grads(lambda *a: fused(*a, fuse=fuse), graph)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref),
                                   atol=2e-5)
        for name, a, b in zip(("x", "gamma", "beta"), g, g_ref):
            a, b = np.asarray(a), np.asarray(b)
            scale = np.abs(b).max()
            assert np.abs(a - b).max() < 1e-4 * scale, (name, graph, fuse)

# bfloat16 activations (the GPU policy): statistics and gradient in float32,
# so the gradient is the float32 one up to bfloat16 rounding of x and y.
x16 = ops.cast(x, "bfloat16")


def fused16(x16, gamma, beta):
    return ops.cast(fused(x16, gamma, beta, FUSE), "float32")


def as_array(t):
    return np.asarray(ops.convert_to_numpy(ops.cast(t, "float32")))


if keras.backend.backend() == "jax":
    import jax
    g16 = jax.grad(lambda *a: (fused16(*a) * w).sum(), (0, 1, 2))(
        x16, gamma, beta)
else:
    import tensorflow as tf
    args = (tf.constant(x16), tf.constant(gamma), tf.constant(beta))
    with tf.GradientTape() as tape:
        tape.watch(args)
        loss = tf.reduce_sum(fused16(*args) * w)
    g16 = tape.gradient(loss, args)
assert keras.backend.standardize_dtype(g16[0].dtype) == "bfloat16"
for name, a, b in zip(("x", "gamma", "beta"), g16, g_ref):
    a, b = as_array(a), np.asarray(b)
    assert np.all(np.isfinite(a)), name
    assert np.abs(a - b).max() < 3e-2 * np.abs(b).max(), name

# The layer as Keras calls it: the same output training or not.
from kits_keras.model.layers import InstanceNormalization
layer = InstanceNormalization(negative_slope=0.01)
np.testing.assert_allclose(np.asarray(layer(x, training=True)),
                           np.asarray(layer(x, training=False)), atol=2e-5)
print("OK", keras.backend.backend())
"""


@pytest.mark.large  # a Keras process per backend; the layer is tested below
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
@pytest.mark.parametrize("check", ["gradient", "inference"])
def test_fused_norm_activation_equals_the_plain_expression(check, backend):
    # The hand-written gradient against autodiff; the inference-fused
    # forward (layers.fuse_inference) against the plain one. Run in a
    # child: the backend is fixed per process.
    script = {"gradient": FUSED_GRADIENT_CHECK,
              "inference": FUSED_INFERENCE_CHECK}[check]
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"OK {backend}" in result.stdout


def test_fused_norm_activation_layer():
    x = np.random.default_rng(5).normal(1.0, 2.0, (1, 4, 5, 6, 3))
    x = x.astype("float32")
    fused = InstanceNormalization(negative_slope=0.1)
    expected = keras.layers.LeakyReLU(negative_slope=0.1)(
        InstanceNormalization()(x))
    np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(expected),
                               atol=1e-6)
    restored = InstanceNormalization.from_config(fused.get_config())
    assert restored.negative_slope == 0.1


def test_instance_norm_bfloat16_statistics_in_float32():
    # An offset well above the spread; the input itself is rounded to
    # bfloat16 (8 bits of mantissa) before the layer sees it.
    x = np.random.default_rng(4).normal(4.0, 1.0, (1, 8, 8, 8, 2))
    layer = InstanceNormalization(dtype="mixed_bfloat16")
    y = layer(x.astype("float32"))
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    y = np.asarray(keras.ops.cast(y, "float32"))
    assert np.abs(y.mean(axis=(1, 2, 3))).max() < 0.05
    assert np.abs(y.std(axis=(1, 2, 3)) - 1).max() < 0.05


@pytest.mark.large  # compiles the whole U-Net; bfloat16 norm is tested above
def test_mixed_bfloat16_model_outputs_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_unet(get_config("tiny"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    outs = model(np.zeros((1, 8, 16, 16, 1), "float32"))
    assert all(
        keras.backend.standardize_dtype(o.dtype) == "float32" for o in outs
    )


def test_count_flops_by_hand():
    # Two levels, stride 2, 4 -> 8 features, 2 classes, patch 4x4x4.
    cfg = override(
        get_config("tiny"),
        model={"num_levels": 2, "base_filters": 4, "max_filters": 8,
               "num_classes": 2, "strides": ((1, 1, 1), (2, 2, 2))},
    )
    v0, v1 = 64, 8
    macs = (v0 * 27 * 1 * 4 + v0 * 27 * 16      # enc0
            + v1 * 27 * 4 * 8 + v1 * 27 * 64    # enc1
            + v0 * 8 * 4                        # dec0_up
            + v0 * 27 * 8 * 4 + v0 * 27 * 16    # dec0 convs
            + v0 * 4 * 2)                       # head0
    assert count_flops(cfg, (4, 4, 4)) == 2 * macs
    with pytest.raises(ValueError, match="multiple"):
        count_flops(cfg, (5, 4, 4))


@pytest.mark.large  # a JAX process compiling the U-Net's gradient
def test_runs_without_tensorflow(tmp_path):
    """Model, loss and gradient on JAX with TensorFlow made unimportable."""
    script = textwrap.dedent("""
        import sys
        sys.modules["tensorflow"] = None
        import jax
        import numpy as np
        import keras
        from kits_keras.config import get_config
        from kits_keras.model.losses import multi_scale_loss
        from kits_keras.model.unet import build_unet
        assert keras.backend.backend() == "jax"
        cfg = get_config("tiny")
        model = build_unet(cfg)
        x = np.zeros((1, 8, 16, 16, 1), "float32")
        ys = [np.zeros((1, 8 // f, 16 // f, 16 // f), "int32")
              for f in (1, 2, 4)]
        tv = [v.value for v in model.trainable_variables]
        def loss(tv):
            outs, _ = model.stateless_call(tv, [], x, training=True)
            return multi_scale_loss(ys, outs, cfg.loss,
                                    cfg.model.output_mode)
        value, grads = jax.value_and_grad(loss)(tv)
        assert np.isfinite(float(value))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
        assert "tensorflow" not in [m.split(".")[0] for m in sys.modules
                                    if sys.modules[m] is not None]
        print("OK", float(value))
    """)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True,
        text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


FUSED_INFERENCE_CHECK = """
import numpy as np, keras
from kits_keras.config import get_config
from kits_keras.model.layers import InstanceNormalization, fuse_inference
from kits_keras.model.unet import build_unet, full_resolution_model

model = build_unet(get_config("tiny"))
x = np.random.default_rng(0).normal(size=(2, 16, 32, 32, 1)).astype("float32")
full = full_resolution_model(model)
plain = np.asarray(full.predict_on_batch(x))
norms = [l for l in model.layers if isinstance(l, InstanceNormalization)]
assert norms and not any(l.fuse_inference for l in norms)
assert fuse_inference(full) is full
# The twin shares the model's layers: both now fuse.
assert all(l.fuse_inference for l in norms)
# A runtime choice, not saved with the model.
assert "fuse_inference" not in norms[0].get_config()
fused = np.asarray(full.predict_on_batch(x))
np.testing.assert_allclose(fused, plain, atol=1e-5)
assert not np.array_equal(fused, plain) or keras.backend.backend() != (
    "tensorflow"), "the fused forward should round differently"
fuse_inference(full, enabled=False)
assert not any(l.fuse_inference for l in norms)
print("OK", keras.backend.backend())
"""
