"""coyo-align's EfficientNet image tower, rebuilt in tf_keras (Keras 2) with the same layers, names and maths.

coyo uses a copy of Keras-applications' EfficientNet with three changes: the stem only rescales to [-1, 1]
(no `Normalization`), there is no top conv / top BN, and every BatchNormalization has `virtual_batch_size=16`
(which gives its variables the shape [1, 1, 1, 1, C] and keeps them out of the fused kernel). The network is
built with an unknown spatial input size, so the stride-2 zero paddings are the asymmetric ones that
`imagenet_utils.correct_pad` picks for an unknown size: ((k//2 - 1, k//2), (k//2 - 1, k//2)).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tf_keras
from tf_keras import layers

from ..spec import BASE_STAGES, SE_RATIO, STEM_FILTERS, VisionSpec, round_filters, round_repeats

DROP_CONNECT_RATE = 0.2
ACTIVATION = "swish"
BN_AXIS = 3

# Keras-applications' initializers, kept so a freshly built model looks like coyo's before training.
CONV_KERNEL_INITIALIZER = {
    "class_name": "VarianceScaling",
    "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"},
}


def _pad_for(tensor, kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The ZeroPadding2D amounts Keras' `correct_pad` chooses before a stride-2 'valid' convolution."""
    height, width = tensor.shape[1], tensor.shape[2]
    half = kernel_size // 2
    if height is None:  # unknown size (coyo's case): Keras assumes an even size and pads one less on the top/left
        adjust = (1, 1)
    else:
        adjust = (1 - height % 2, 1 - width % 2)
    return ((half - adjust[0], half), (half - adjust[1], half))


def _batch_norm(vision: VisionSpec, name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(
        axis=BN_AXIS,
        epsilon=vision.batch_norm_eps,
        virtual_batch_size=vision.virtual_batch_size,
        name=name,
    )


def _block(
    x,
    vision: VisionSpec,
    *,
    name: str,
    drop_rate: float,
    filters_in: int,
    filters_out: int,
    kernel_size: int,
    strides: int,
    expand_ratio: int,
):
    """One MBConv block, named `{name}expand_conv`, `{name}dwconv`, ... as Keras-applications names them."""
    inputs = x
    filters = filters_in * expand_ratio
    if expand_ratio != 1:
        x = layers.Conv2D(
            filters, 1, padding="same", use_bias=False,
            kernel_initializer=CONV_KERNEL_INITIALIZER, name=name + "expand_conv",
        )(x)
        x = _batch_norm(vision, name + "expand_bn")(x)
        x = layers.Activation(ACTIVATION, name=name + "expand_activation")(x)

    if strides == 2:
        x = layers.ZeroPadding2D(padding=_pad_for(x, kernel_size), name=name + "dwconv_pad")(x)
        conv_pad = "valid"
    else:
        conv_pad = "same"
    x = layers.DepthwiseConv2D(
        kernel_size, strides=strides, padding=conv_pad, use_bias=False,
        depthwise_initializer=CONV_KERNEL_INITIALIZER, name=name + "dwconv",
    )(x)
    x = _batch_norm(vision, name + "bn")(x)
    x = layers.Activation(ACTIVATION, name=name + "activation")(x)

    # Squeeze-and-excitation; its width comes from the block's *input* filters.
    filters_se = max(1, int(filters_in * SE_RATIO))
    se = layers.GlobalAveragePooling2D(name=name + "se_squeeze")(x)
    se = layers.Reshape((1, 1, filters), name=name + "se_reshape")(se)
    se = layers.Conv2D(
        filters_se, 1, padding="same", activation=ACTIVATION,
        kernel_initializer=CONV_KERNEL_INITIALIZER, name=name + "se_reduce",
    )(se)
    se = layers.Conv2D(
        filters, 1, padding="same", activation="sigmoid",
        kernel_initializer=CONV_KERNEL_INITIALIZER, name=name + "se_expand",
    )(se)
    x = layers.multiply([x, se], name=name + "se_excite")

    x = layers.Conv2D(
        filters_out, 1, padding="same", use_bias=False,
        kernel_initializer=CONV_KERNEL_INITIALIZER, name=name + "project_conv",
    )(x)
    x = _batch_norm(vision, name + "project_bn")(x)
    if strides == 1 and filters_in == filters_out:  # id_skip is always True in coyo's block arguments
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=name + "drop")(x)
        x = layers.add([x, inputs], name=name + "add")
    return x


def model_name(vision: VisionSpec) -> str:
    return "efficientnet" + (vision.variant or "")


def build_efficientnet(vision: VisionSpec) -> tf_keras.Model:
    """coyo's `EfficientNetBx(include_top=False, pooling='avg', weights=None)`: a functional model on (None, None, 3)."""
    img_input = layers.Input(shape=(None, None, 3))
    x = layers.Rescaling(scale=1.0 / 127.5, offset=-1)(img_input)
    x = layers.ZeroPadding2D(padding=_pad_for(x, 3), name="stem_conv_pad")(x)
    x = layers.Conv2D(
        round_filters(STEM_FILTERS, vision.width_coefficient), 3, strides=2, padding="valid", use_bias=False,
        kernel_initializer=CONV_KERNEL_INITIALIZER, name="stem_conv",
    )(x)
    x = _batch_norm(vision, "stem_bn")(x)
    x = layers.Activation(ACTIVATION, name="stem_activation")(x)

    total = float(vision.num_blocks)
    b = 0
    for i, (kernel, repeats, f_in, f_out, expand, stride) in enumerate(BASE_STAGES):
        filters_in = round_filters(f_in, vision.width_coefficient)
        filters_out = round_filters(f_out, vision.width_coefficient)
        for j in range(round_repeats(repeats, vision.depth_coefficient)):
            x = _block(
                x,
                vision,
                name=f"block{i + 1}{chr(j + 97)}_",
                drop_rate=DROP_CONNECT_RATE * b / total,
                filters_in=filters_in if j == 0 else filters_out,
                filters_out=filters_out,
                kernel_size=kernel,
                strides=stride if j == 0 else 1,
                expand_ratio=expand,
            )
            b += 1

    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return tf_keras.Model(img_input, x, name=model_name(vision))
