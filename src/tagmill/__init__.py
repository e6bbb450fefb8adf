"""tagmill: self-hosted image classification, from labelled images to a live service.

In a notebook::

    import tagmill

    tagmill.import_dataset("labels.csv", "ds", images="photos", suffix=".jpg")
    run = tagmill.train_model("ds", "runs/a")
    tagmill.evaluate_model("runs/a", "ds")
    tagmill.export_bundle("runs/a", "bundles/a")
    model = tagmill.load_bundle("bundles/a")
    model.predict("photo.jpg").labels
    tagmill.diagnose_dataset("ds", "doctor").counts()

The names below are loaded when first used, so ``import tagmill`` stays fast (no
torch until a function that needs it runs). ``tagmill.api`` says more.
"""

# imported under private names: every public name of this module is in __all__
import importlib as _importlib
import typing as _typing
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("tagmill")
except _PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

#: public name → the module that defines it
_LAZY = {
    "import_dataset": "tagmill.api",
    "diagnose_dataset": "tagmill.api",
    "train_model": "tagmill.api",
    "evaluate_model": "tagmill.api",
    "export_bundle": "tagmill.api",
    "load_bundle": "tagmill.api",
    "Predictor": "tagmill.bundle.predictor",
    "Prediction": "tagmill.bundle.predictor",
    "TrainConfig": "tagmill.train.config",
    "TagmillError": "tagmill.errors",
    "InputError": "tagmill.errors",
}

if _typing.TYPE_CHECKING:
    from tagmill.api import diagnose_dataset, evaluate_model, export_bundle, import_dataset, load_bundle, train_model
    from tagmill.bundle.predictor import Prediction, Predictor
    from tagmill.errors import InputError, TagmillError
    from tagmill.train.config import TrainConfig


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tagmill' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "__version__",
    "diagnose_dataset",
    "evaluate_model",
    "export_bundle",
    "import_dataset",
    "InputError",
    "load_bundle",
    "Prediction",
    "Predictor",
    "TagmillError",
    "train_model",
    "TrainConfig",
]
