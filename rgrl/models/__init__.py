"""Native Dream and LLaDA implementations, registered with the transformers Auto classes.

The registrations use the real checkpoints' `model_type` values, so a checkpoint directory (or Hub id) of
Dream-v0-Instruct-7B or LLaDA-8B-Instruct loads natively -- also when its config still carries the Hub's
`auto_map`, because transformers prefers registered local code unless `trust_remote_code=True` is passed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from rgrl.models.configuration_dream import DreamConfig
from rgrl.models.configuration_llada import LLaDAConfig
from rgrl.models.modeling_dream import DreamModel
from rgrl.models.modeling_llada import LLaDAModelLM

for _config_class, _model_class in ((DreamConfig, DreamModel), (LLaDAConfig, LLaDAModelLM)):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)
    AutoModelForMaskedLM.register(_config_class, _model_class, exist_ok=True)

__all__ = ["DreamConfig", "DreamModel", "LLaDAConfig", "LLaDAModelLM"]
