"""Runtime: load a bundle and generate. Imports neither torch nor transformers.

from llama4_deploy.runtime import load
engine = load("build/tiny")
out = engine.generate([[1, 2, 3]], max_new_tokens=16)
"""

from llama4_deploy.runtime.bundle import BundleError, Manifest, read_manifest
from llama4_deploy.runtime.engine import Engine, Generation, NonFiniteLogitsError, load
from llama4_deploy.runtime.scheduler import QueueFull, Request, Scheduler

__all__ = [
    "BundleError",
    "Engine",
    "Generation",
    "Manifest",
    "NonFiniteLogitsError",
    "QueueFull",
    "Request",
    "Scheduler",
    "load",
    "read_manifest",
]
