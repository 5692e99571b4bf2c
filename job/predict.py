"""Classify image files with a trained run's model, as the tutorial's prediction step."""

from __future__ import annotations

import json
import os

from job.data import FILE_DATASETS
from job.errors import DataError, UserError


def classify(model_dir: str, image_paths: list[str], top_k: int) -> list[dict]:
    """Top-k classes with probabilities for each image, best first."""
    from job import tfenv
    tf, keras = tfenv.tensorflow()

    model_file = os.path.join(model_dir, "model.keras")
    if not os.path.isfile(model_file):
        raise UserError(f"no model.keras in {model_dir}; MODEL_DIR must be a run folder written by 'train'")
    model = keras.models.load_model(model_file)
    run = _run_metrics(model_dir)
    class_names = _class_names(run, model.output_shape[-1])
    input_shape = model.input_shape[1:]
    # As the run evaluated: image datasets by a centre crop of the resized image, the small
    # array datasets by resizing the whole image.
    crop = run.get("dataset") in FILE_DATASETS

    batch = tf.stack([_read_image(path, input_shape, crop) for path in image_paths])
    probabilities = model.predict(batch, verbose=0)
    results = []
    for path, row in zip(image_paths, probabilities):
        best = row.argsort()[::-1][:top_k]
        results.append({"image": path, "top": [{"class": class_names[i], "index": int(i),
                                                "probability": float(row[i])} for i in best]})
    return results


def _read_image(path: str, input_shape, crop: bool):
    from job.data import image_pipeline, pipeline
    tf = pipeline.tf
    try:
        raw = tf.io.read_file(path)
        image = tf.io.decode_image(raw, expand_animations=False)
    except tf.errors.NotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        raise DataError(f"cannot decode {path}; expected a PNG or JPEG image") from None
    if image.shape[-1] == 4:  # PNG with alpha: drop it
        image = image[..., :3]
    if crop:
        channels = input_shape[-1]
        if image.shape[-1] != channels:
            image = tf.image.grayscale_to_rgb(image) if channels == 3 else tf.image.rgb_to_grayscale(image)
        return image_pipeline.evaluation_image(image, input_shape)
    return pipeline.to_model_input(image[tf.newaxis], input_shape)[0]


def _run_metrics(model_dir: str) -> dict:
    try:
        with open(os.path.join(model_dir, "metrics.json"), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _class_names(run: dict, classes: int) -> list[str]:
    """Class names recorded with the run, or the class indices."""
    names = run.get("class_names")
    return names if names and len(names) == classes else [str(i) for i in range(classes)]
