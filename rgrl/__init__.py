"""rgrl: reward-guided RL post-training for masked diffusion language models.

Importing rgrl registers the native Dream and LLaDA architectures with the transformers Auto classes, so
`AutoModel.from_pretrained("Dream-org/Dream-v0-Instruct-7B")` loads them without remote code.
"""

from rgrl import models  # noqa: F401  (registers the Auto classes)

__version__ = "0.1.0"
