"""Tests of kits_keras/training/step.py (JAX only; run in a JAX subprocess so
they do not depend on the backend the test session imported)."""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["tensorflow"] = None  # the step must not need TensorFlow
    import keras
    import numpy as np
    from kits_keras.config import get_config, override
    from kits_keras.model.losses import multi_scale_loss
    from kits_keras.model.unet import build_unet
    from kits_keras.training.step import assign_state, make_forward
    from kits_keras.training.step import make_train_step

    keras.utils.set_random_seed(0)
    # The paper's head and loss: softmax + exp-log.
    cfg = override(get_config("tiny"), model={"base_filters": 4,
                                              "max_filters": 8,
                                              "output_mode": "softmax"})
    model = build_unet(cfg)
    rng = np.random.default_rng(0)
    y = np.zeros((2, 8, 16, 16), "int32")
    y[:, 2:6, 4:12, 4:12] = 1
    y[:, 3:5, 6:10, 6:10] = 2
    x = (y + rng.normal(0, 0.3, y.shape))[..., None].astype("float32")
    ys = [y[:, ::f, ::f, ::f] for f in (1, 2, 4)]

    optimizer = keras.optimizers.Adam(1e-2)
    before = float(multi_scale_loss(ys, model(x), cfg.loss))
    step, state = make_train_step(model, cfg.loss, optimizer)
    state, first = step(state, x, ys)
    assert abs(float(first) - before) < 1e-4, (float(first), before)
    losses = [float(first)]
    for _ in range(29):
        state, loss = step(state, x, ys)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    forward = make_forward(model)
    outs = forward(state, x)
    assign_state(model, optimizer, state)
    assert int(optimizer.iterations.numpy()) == 30
    np.testing.assert_allclose(np.asarray(model(x)[0]), np.asarray(outs[0]),
                               atol=1e-5)
    print("OK", losses[0], losses[-1])
""")


@pytest.mark.large  # a JAX process compiling the U-Net's step (~20-30 s)
def test_step_trains_and_writes_back():
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True,
        text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


@pytest.mark.skipif(keras.backend.backend() == "jax",
                    reason="checks the error on other backends")
def test_other_backend_is_refused():
    from kits_keras.config import get_config
    from kits_keras.model.unet import build_unet
    from kits_keras.training.step import make_train_step

    cfg = get_config("tiny")
    with pytest.raises(ValueError, match="JAX"):
        make_train_step(build_unet(cfg), cfg.loss, keras.optimizers.Adam())
