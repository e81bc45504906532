"""llama4-deploy: Llama 4 checkpoints compiled into static-shape inference engines."""

__version__ = "0.1.0"
