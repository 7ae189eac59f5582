"""Tests of the chapter's models: shapes, the model factory, parameter counts."""

from __future__ import annotations

import pytest
import torch

from course_lib.models import (
    MLP,
    MODEL_CHOICES,
    SmallCNN,
    build_model,
    count_parameters,
)

INPUT_SHAPES = [(1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("input_shape", INPUT_SHAPES)
@pytest.mark.parametrize("model_class", [MLP, SmallCNN])
def test_output_shape(model_class, input_shape):
    model = model_class(input_shape, num_classes=10).eval()
    inputs = torch.randn(4, *input_shape)

    with torch.no_grad():
        logits = model(inputs)

    assert logits.shape == (4, 10)


@pytest.mark.parametrize("input_shape", INPUT_SHAPES)
@pytest.mark.parametrize("name", MODEL_CHOICES)
def test_build_model_shape(name, input_shape):
    model = build_model(name, input_shape, num_classes=3).eval()

    with torch.no_grad():
        logits = model(torch.randn(2, *input_shape))

    assert logits.shape == (2, 3)


def test_build_model_classes():
    assert isinstance(build_model("mlp", (1, 28, 28), 10), MLP)
    assert isinstance(build_model("cnn", (1, 28, 28), 10), SmallCNN)


def test_build_model_name_spelling():
    assert isinstance(build_model(" CNN ", (1, 28, 28), 10), SmallCNN)


def test_build_model_passes_kwargs():
    model = build_model("mlp", (1, 28, 28), 10, hidden=32)

    assert model[1].out_features == 32


def test_build_model_unknown_name():
    with pytest.raises(ValueError) as excinfo:
        build_model("resnet", (1, 28, 28), 10)
    message = str(excinfo.value)

    assert "'resnet'" in message
    for choice in MODEL_CHOICES:
        assert choice in message


def test_cnn_rejects_odd_size():
    with pytest.raises(ValueError) as excinfo:
        SmallCNN((1, 30, 30))

    assert "(1, 30, 30)" in str(excinfo.value)


def test_cnn_train_step_changes_weights():
    # A real backward pass through BatchNorm and dropout in train mode.
    model = SmallCNN((1, 28, 28), num_classes=10)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(
        model(torch.randn(8, 1, 28, 28)), torch.arange(8)
    )

    loss.backward()
    optimizer.step()

    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed)


def test_count_parameters_mlp():
    # 784 * 256 + 256 weights and biases in, 256 * 10 + 10 out.
    model = MLP((1, 28, 28), num_classes=10, hidden=256)

    assert count_parameters(model) == 784 * 256 + 256 + 256 * 10 + 10


def test_count_parameters_cnn():
    # Convolutions have no bias. Each BatchNorm has a weight and a bias per
    # channel. Two 2x poolings leave 7x7 maps of 32 channels.
    model = SmallCNN((1, 28, 28), num_classes=10, width=16)
    conv = 1 * 16 * 9 + 16 * 32 * 9
    batch_norm = 2 * 16 + 2 * 32
    linear = 32 * 7 * 7 * 10 + 10

    assert count_parameters(model) == conv + batch_norm + linear


def test_count_parameters_skips_frozen():
    model = MLP((1, 28, 28), num_classes=10, hidden=256)
    model[1].requires_grad_(False)

    assert count_parameters(model) == 256 * 10 + 10
