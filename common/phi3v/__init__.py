"""Native Phi-3-V (Phi-3.5-vision) model family, registered with transformers' Auto classes.

After `import common.phi3v` (which importing any of its modules does), `AutoConfig`, `AutoModelForCausalLM`, `AutoImageProcessor` and `AutoProcessor`
load official Phi-3.5-vision folders with this code; the `.py` files such folders carry are never run.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor

from .configuration_phi3_v import Phi3VConfig
from .image_processing_phi3_v import Phi3VImageProcessor
from .modeling_phi3_v import Phi3VForCausalLM, Phi3VModel
from .processing_phi3_v import Phi3VProcessor

AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
AutoImageProcessor.register(Phi3VConfig, slow_image_processor_class=Phi3VImageProcessor, exist_ok=True)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VModel", "Phi3VProcessor"]
