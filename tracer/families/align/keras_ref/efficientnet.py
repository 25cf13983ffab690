"""coyo-align's EfficientNet image tower, rebuilt in tf_keras (Keras 2) with the same layers, names and maths.

coyo uses a copy of Keras-applications' EfficientNet with three changes: the stem only rescales to [-1, 1]
(no `Normalization`), there is no top conv / top BN, and every BatchNormalization has `virtual_batch_size=16`
(which gives its variables the shape [1, 1, 1, 1, C] and keeps them out of the fused kernel). The network is
built with an unknown spatial input size, so the stride-2 zero paddings are the asymmetric ones that
`imagenet_utils.correct_pad` picks for an unknown size: ((k//2 - 1, k//2), (k//2 - 1, k//2)).
"""

from __future__ import annotations

import numpy as np
import tf_keras
from tf_keras import layers

from tracer.families.align.spec import BASE_STAGES, SE_RATIO, STEM_FILTERS, VisionSpec, round_filters, round_repeats

DROP_CONNECT_RATE = 0.2
ACTIVATION = "swish"
BN_AXIS = 3
# coyo's `Rescaling(1.0 / 127.5)` runs in float32: the layer casts its scale to float32. Given as that float32 value,
# a float64 build (`--float64`) multiplies by the same number the original does, as the HF side then does too
# (`inputs.RESCALE_FACTOR_FLOAT32`); in float32 nothing changes.
RESCALE_SCALE = float(np.float32(1.0 / 127.5))

# Keras-applications' initializers, kept so a freshly built model looks like coyo's before training.
CONV_KERNEL_INITIALIZER = {
    "class_name": "VarianceScaling",
    "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"},
}


def _pad_for(kernel_size: int, height: int | None = None, width: int | None = None) -> tuple[tuple[int, int], ...]:
    """The ZeroPadding2D amounts Keras' `correct_pad` chooses before a stride-2 'valid' convolution.

    The topology below always asks for the unknown-size choice (no `height`/`width`): coyo builds the network on
    (None, None, 3), so that choice is baked into its layers whatever size the images have, in the functional build
    and in the eager one (`eager.EagerReference`, which sees real sizes but must not use them here).
    """
    half = kernel_size // 2
    if height is None or width is None:  # unknown size (coyo's case): Keras assumes even and pads one less top/left
        adjust = (1, 1)
    else:
        adjust = (1 - height % 2, 1 - width % 2)
    return ((half - adjust[0], half), (half - adjust[1], half))


class NewLayers:
    """The layer factory of the functional build: `make(cls, name, *args, **kwargs)` creates the named layer.

    The topology functions below (`efficientnet_features`, `_block`) create every layer through a factory and call
    what it returns on their tensors, so the functional build and the eager one (`eager.EagerLayers`, which creates
    each named layer once, returns the same layer on later calls and reports every call to a hook) share one
    description of the network. `end_block` is told where each MBConv block starts and ends; this factory ignores it.
    """

    def __call__(self, cls, name: str, *args, **kwargs):
        return cls(*args, name=name, **kwargs)

    def end_block(self, name: str, block_input, block_output) -> None:
        return None


def _batch_norm(vision: VisionSpec, name: str, make) -> layers.BatchNormalization:
    return make(
        layers.BatchNormalization,
        name,
        axis=BN_AXIS,
        epsilon=vision.batch_norm_eps,
        virtual_batch_size=vision.virtual_batch_size,
    )


def _block(
    x,
    vision: VisionSpec,
    make,
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
        x = make(
            layers.Conv2D, name + "expand_conv", filters, 1, padding="same", use_bias=False,
            kernel_initializer=CONV_KERNEL_INITIALIZER,
        )(x)
        x = _batch_norm(vision, name + "expand_bn", make)(x)
        x = make(layers.Activation, name + "expand_activation", ACTIVATION)(x)

    if strides == 2:
        x = make(layers.ZeroPadding2D, name + "dwconv_pad", padding=_pad_for(kernel_size))(x)
        conv_pad = "valid"
    else:
        conv_pad = "same"
    x = make(
        layers.DepthwiseConv2D, name + "dwconv", kernel_size, strides=strides, padding=conv_pad, use_bias=False,
        depthwise_initializer=CONV_KERNEL_INITIALIZER,
    )(x)
    x = _batch_norm(vision, name + "bn", make)(x)
    x = make(layers.Activation, name + "activation", ACTIVATION)(x)

    # Squeeze-and-excitation; its width comes from the block's *input* filters.
    filters_se = max(1, int(filters_in * SE_RATIO))
    se = make(layers.GlobalAveragePooling2D, name + "se_squeeze")(x)
    se = make(layers.Reshape, name + "se_reshape", (1, 1, filters))(se)
    se = make(
        layers.Conv2D, name + "se_reduce", filters_se, 1, padding="same", activation=ACTIVATION,
        kernel_initializer=CONV_KERNEL_INITIALIZER,
    )(se)
    se = make(
        layers.Conv2D, name + "se_expand", filters, 1, padding="same", activation="sigmoid",
        kernel_initializer=CONV_KERNEL_INITIALIZER,
    )(se)
    x = make(layers.Multiply, name + "se_excite")([x, se])  # = layers.multiply([x, se], name=...)

    x = make(
        layers.Conv2D, name + "project_conv", filters_out, 1, padding="same", use_bias=False,
        kernel_initializer=CONV_KERNEL_INITIALIZER,
    )(x)
    x = _batch_norm(vision, name + "project_bn", make)(x)
    if strides == 1 and filters_in == filters_out:  # id_skip is always True in coyo's block arguments
        if drop_rate > 0:
            x = make(layers.Dropout, name + "drop", drop_rate, noise_shape=(None, 1, 1, 1))(x)
        x = make(layers.Add, name + "add")([x, inputs])  # = layers.add([x, inputs], name=...)
    make.end_block(name.rstrip("_"), inputs, x)
    return x


def model_name(vision: VisionSpec) -> str:
    return "efficientnet" + (vision.variant or "")


def efficientnet_features(x, vision: VisionSpec, make):
    """coyo's EfficientNet from the 0..255 NHWC pixels `x` to the pooled features, every layer made by `make`
    (`NewLayers` for the functional build, `eager.EagerLayers` for the eager one)."""
    # coyo leaves the Rescaling unnamed (Keras calls the first one `rescaling`, later ones `rescaling_1`, ...);
    # naming it keeps the layer path stable when several models are built in one process. It has no variables.
    x = make(layers.Rescaling, "rescaling", scale=RESCALE_SCALE, offset=-1)(x)
    x = make(layers.ZeroPadding2D, "stem_conv_pad", padding=_pad_for(3))(x)
    x = make(
        layers.Conv2D, "stem_conv", round_filters(STEM_FILTERS, vision.width_coefficient), 3, strides=2,
        padding="valid", use_bias=False, kernel_initializer=CONV_KERNEL_INITIALIZER,
    )(x)
    x = _batch_norm(vision, "stem_bn", make)(x)
    x = make(layers.Activation, "stem_activation", ACTIVATION)(x)

    total = float(vision.num_blocks)
    b = 0
    for i, (kernel, repeats, f_in, f_out, expand, stride) in enumerate(BASE_STAGES):
        filters_in = round_filters(f_in, vision.width_coefficient)
        filters_out = round_filters(f_out, vision.width_coefficient)
        for j in range(round_repeats(repeats, vision.depth_coefficient)):
            x = _block(
                x,
                vision,
                make,
                name=f"block{i + 1}{chr(j + 97)}_",
                drop_rate=DROP_CONNECT_RATE * b / total,
                filters_in=filters_in if j == 0 else filters_out,
                filters_out=filters_out,
                kernel_size=kernel,
                strides=stride if j == 0 else 1,
                expand_ratio=expand,
            )
            b += 1

    return make(layers.GlobalAveragePooling2D, "avg_pool")(x)


def build_efficientnet(vision: VisionSpec) -> tf_keras.Model:
    """coyo's `EfficientNetBx(include_top=False, pooling='avg', weights=None)`: a functional model on (None, None, 3)."""
    img_input = layers.Input(shape=(None, None, 3))
    x = efficientnet_features(img_input, vision, NewLayers())
    return tf_keras.Model(img_input, x, name=model_name(vision))
