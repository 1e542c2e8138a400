"""The digit classifier that judges generated handwritten digits.

A scikit-learn SVM fitted on the *training* split of scikit-learn's bundled 8×8 digits
(``anygen.data.digits.split_digits``, the split the ``digits`` data set uses), scored on the held-out
split so its own accuracy is known. Every image, real or generated, goes through the same
``features``: rendered to an RGB image the way the data set writes it (for the real digits), then
grey, box-reduced to 8×8 and scaled to 0..16, so the classifier sees generated images the way it saw
its training images.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import PIL.Image

from anygen.data.digits import load_digit_images, render_digit, split_digits


def features(image: PIL.Image.Image) -> np.ndarray:
    """``(64,)`` float: the image as grey, box-reduced to 8×8, in 0..16."""
    grey = image.convert("L").resize((8, 8), PIL.Image.BOX)
    return np.asarray(grey, dtype=np.float32).reshape(-1) * (16.0 / 255.0)


@dataclass
class DigitClassifier:
    """An SVM over ``features`` and its accuracy on the held-out split.

    Attributes:
        model: the fitted ``sklearn.svm.SVC``.
        heldout_accuracy: accuracy on the held-out split (images no training document shows).
        num_train / num_heldout: split sizes.
    """

    model: object
    heldout_accuracy: float
    num_train: int
    num_heldout: int

    def predict(self, images: list[PIL.Image.Image]) -> list[int]:
        """The digit each image shows."""
        if not images:
            return []
        return [int(v) for v in self.model.predict(np.stack([features(im) for im in images]))]


@functools.cache
def digit_classifier(holdout: float = 0.2, seed: int = 0, size: int = 64) -> DigitClassifier:
    """Fit (once per process and arguments) the classifier on the training split of ``seed``.

    Args:
        holdout: the held-out fraction of the data set (``anygen data digits --holdout``).
        seed: the data set's seed (``--seed``).
        size: the pixel side the data set renders digits at (``--image-size``).
    """
    from sklearn.svm import SVC

    images, labels = load_digit_images()
    train, heldout = split_digits(labels, holdout, seed)

    def table(indices: list[int]) -> np.ndarray:
        return np.stack([features(render_digit(images[i], size)) for i in indices])

    model = SVC(C=10.0, gamma=0.001).fit(table(train), labels[train])
    accuracy = float((model.predict(table(heldout)) == labels[heldout]).mean()) if heldout else float("nan")
    return DigitClassifier(model, accuracy, len(train), len(heldout))


__all__ = ["DigitClassifier", "digit_classifier", "features"]
