"""The chapter's models: a multilayer perceptron and a small CNN."""

from __future__ import annotations

import math

from torch import nn

MODEL_CHOICES = ("cnn", "mlp")


class MLP(nn.Sequential):
    """Flatten, one hidden ReLU layer with dropout, then logits.

    Args:
        input_shape: shape of one input, for example (1, 28, 28).
        num_classes: number of output logits.
        hidden: width of the hidden layer.
        dropout: dropout probability after the hidden layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 28, 28),
        num_classes: int = 10,
        hidden: int = 256,
        dropout: float = 0.2,
    ) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )


class SmallCNN(nn.Module):
    """Two conv-BatchNorm-ReLU-pool blocks and a linear classifier.

    Args:
        input_shape: (channels, height, width); height and width are halved
            twice, so they must be divisible by 4 (28 and 32 are).
        num_classes: number of output logits.
        width: channels of the first block; the second block has twice as many.
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        width: int = 16,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        if height % 4 or width_px % 4:
            raise ValueError(
                f"SmallCNN needs height and width divisible by 4, got {input_shape}; "
                "resize or crop the images"
            )
        self.features = nn.Sequential(
            _conv_block(channels, width),
            _conv_block(width, 2 * width),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * (height // 4) * (width_px // 4), num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # BatchNorm follows the convolution, so the convolution needs no bias.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs
) -> nn.Module:
    """Build the model called `name` ("cnn" or "mlp") for the given data."""
    key = name.strip().lower()
    if key == "cnn":
        return SmallCNN(input_shape, num_classes, **kwargs)
    if key == "mlp":
        return MLP(input_shape, num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODEL_CHOICES)}")


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
