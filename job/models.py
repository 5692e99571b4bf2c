"""The networks of the reference tutorial (../shared/reference/keras-alexnet-tutorial.md).

`alexnet` is the tutorial's 224x224x3 AlexNet layer for layer (25,678,184 parameters with 1000
classes); `alexnet-mnist` is its reduced MNIST network. Both are tf-keras (Keras 2) models:
Keras 3 cannot run multi-worker `fit` (keras-team/keras#20585), so TF_USE_LEGACY_KERAS=1 must
be set before TensorFlow is imported (job.tfenv does that).
"""

from __future__ import annotations

from job import tfenv
from job.config import MODEL_DEFAULTS

tf, keras = tfenv.tensorflow()
layers = keras.layers

# Keras dtype policies for the `mixed_precision` option. The output softmax always runs in
# float32 so that the loss is computed in full precision.
POLICIES = {"off": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def alexnet(input_shape, num_classes, dtype):
    """The tutorial's AlexNet: five convolutions, three max-pools, two dropout FC layers."""
    return keras.Sequential([
        keras.Input(shape=input_shape),
        layers.Conv2D(96, (11, 11), strides=(4, 4), padding="valid", dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.MaxPooling2D((3, 3), strides=(2, 2), padding="valid", dtype=dtype),
        layers.Conv2D(256, (5, 5), strides=(1, 1), padding="valid", dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.MaxPooling2D((3, 3), strides=(2, 2), padding="valid", dtype=dtype),
        layers.Conv2D(384, (3, 3), strides=(1, 1), padding="valid", dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.Conv2D(384, (3, 3), strides=(1, 1), padding="valid", dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.Conv2D(256, (3, 3), strides=(1, 1), padding="valid", dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.MaxPooling2D((3, 3), strides=(2, 2), padding="valid", dtype=dtype),
        layers.Flatten(dtype=dtype),
        layers.Dense(4096, dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.Dropout(0.5, dtype=dtype),
        layers.Dense(4096, dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.Dropout(0.5, dtype=dtype),
        layers.Dense(num_classes, dtype=dtype),
        layers.Activation("softmax", dtype="float32"),
    ], name="alexnet")


def alexnet_mnist(input_shape, num_classes, dtype):
    """The tutorial's reduced AlexNet for 28x28 digits: four convolutions, one FC layer."""
    return keras.Sequential([
        keras.Input(shape=input_shape),
        layers.Conv2D(32, (3, 3), strides=(1, 1), padding="valid", dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.MaxPooling2D((3, 3), strides=(1, 1), padding="valid", dtype=dtype),
        layers.Conv2D(32, (3, 3), strides=(1, 1), padding="valid", dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.MaxPooling2D((3, 3), strides=(1, 1), padding="valid", dtype=dtype),
        layers.Conv2D(64, (3, 3), strides=(1, 1), padding="valid", dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.Conv2D(64, (3, 3), strides=(1, 1), padding="valid", dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.MaxPooling2D((3, 3), strides=(2, 2), padding="valid", dtype=dtype),
        layers.Flatten(dtype=dtype),
        layers.Dense(512, dtype=dtype),
        layers.Activation("relu", dtype=dtype),
        layers.Dropout(0.3, dtype=dtype),
        layers.Dense(num_classes, dtype=dtype),
        layers.Activation("softmax", dtype="float32"),
    ], name="alexnet_mnist")


REGISTRY = {"alexnet": alexnet, "alexnet-mnist": alexnet_mnist}


def build(name: str, input_shape=None, num_classes=None, mixed_precision: str = "off"):
    """An uncompiled model by registry name; shape and classes default to the tutorial's."""
    default_shape, default_classes = MODEL_DEFAULTS[name]
    return REGISTRY[name](tuple(input_shape or default_shape), num_classes or default_classes,
                          POLICIES[mixed_precision])


def compile_for_training(model, learning_rate, mixed_precision: str = "off"):
    """Adam + sparse categorical cross-entropy, as the tutorial (labels are class indices);
    accuracy, and top-5 accuracy where there are more than five classes."""
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if mixed_precision == "fp16":
        # float16 gradients underflow without loss scaling; bf16 has float32's range.
        optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
    metrics = ["accuracy"]
    if model.output_shape[-1] > 5:  # ImageNet's customary second figure
        metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5_accuracy"))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=metrics)
    return model


def export_for_serving(model, path: str) -> None:
    """A SavedModel of `model` in TensorFlow Serving's layout, with one signature:
    serving_default(images: float32 [N, H, W, C] in [0, 1]) -> {"probabilities": [N, classes]}.

    Only the variables and this one function are saved. Saving the Keras model object itself
    would trace every layer's call as well: 1.3 s instead of 0.2 s for alexnet-mnist.
    """
    serving = tf.Module()
    serving.weights = list(model.variables)  # tracked, so the SavedModel holds them

    @tf.function(input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="images")])
    def serve(images):
        return {"probabilities": model(images, training=False)}

    tf.saved_model.save(serving, path, signatures={"serving_default": serve})

