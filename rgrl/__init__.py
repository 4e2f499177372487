"""rgrl: reward-guided RL post-training for masked diffusion language models.

Importing rgrl registers the native Dream and LLaDA architectures with the transformers Auto classes, so
`AutoModel.from_pretrained("Dream-org/Dream-v0-Instruct-7B")` loads them without remote code, and rgrl's own
checkpoint names (`toy:<name>`, `tiny:<name>`, see `rgrl.toy`) with the loader, so they work wherever a model path
is accepted.
"""

from rgrl import models  # noqa: F401  (registers the Auto classes)
from rgrl import toy  # noqa: F401  (registers the toy: and tiny: checkpoint schemes)

__version__ = "0.1.0"
