"""llama4-deploy: Llama 4 checkpoints compiled into static-shape inference engines."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # the text-in API needs the serve extra (jinja2 for chat templates): imported when first asked for, so
    # `import llama4_deploy` (the CLI) stays light
    if name in ("LLM", "SamplingParams"):
        from llama4_deploy.serving import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'llama4_deploy' has no attribute {name!r}")
