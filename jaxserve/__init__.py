"""jaxserve: an LLM inference engine in JAX for TPU, GPU and CPU."""

import logging
import os

from jaxserve.llm import LLM
from jaxserve.outputs import ChatOutput, CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ChatOutput"]
__version__ = "0.1.0"

# Like vLLM, show INFO lines (model summary, engine ready) unless the application configures logging itself.
_log = logging.getLogger("jaxserve")
if not _log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    _log.addHandler(_handler)
    _log.setLevel(os.environ.get("JAXSERVE_LOGGING_LEVEL", "INFO"))
