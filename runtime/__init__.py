"""dmf.runtime: torch-free inference from an exported artifact folder (docs/artifact.md).

    from dmf.runtime import Predictor, MicroBatcher
    predictor = Predictor.load("artifacts/demo-memory")          # engine from dmf.json
    predictor.predict("clip.wav", "I can't believe it!")        # -> Prediction(label, probabilities)

Never imports torch or transformers (edge installs); onnxruntime, tensorrt, starlette and uvicorn
are imported inside the functions that need them.
"""

from dmf.preprocess import AudioError, TextError

from .artifact import Artifact, ArtifactError, load_artifact
from .batcher import BatcherClosed, MicroBatcher, Overloaded
from .engine import EngineError
from .engines import create_engine
from .ort import OrtEngine, available_providers
from .predictor import INPUT_ERRORS, InputError, Prediction, Predictor
from .server import ServeOptions, create_app

__all__ = [
    "Predictor", "Prediction", "MicroBatcher", "ServeOptions", "create_app",
    "Artifact", "load_artifact", "create_engine", "available_providers", "OrtEngine", "TrtEngine",
    "ArtifactError", "EngineError", "AudioError", "TextError", "InputError", "INPUT_ERRORS",
    "BatcherClosed", "Overloaded",
]


def __getattr__(name: str):
    if name == "TrtEngine":  # lazily: ctypes CUDA loading is only for TensorRT users
        from .trt import TrtEngine

        return TrtEngine
    raise AttributeError(f"module 'dmf.runtime' has no attribute {name!r}")
