"""TPO trainer for Hugging Face LLaVA models (token-level preference optimization, arXiv 2412.14487).

Not TRL's `trl.experimental.tpo.TPOTrainer`, which is *Triple* Preference Optimization.
The data side (`PreferenceDataset`, `TPOCollator`, `add_diffusion_noise`) imports without the loss;
`TPOTrainer`, `TPOConfig` and the step functions are loaded on first use.
"""

from tpo_fast.trainer.collator import TPOCollator
from tpo_fast.trainer.corruption import add_diffusion_noise
from tpo_fast.trainer.data import BadRecord, PreferenceDataset, load_preference_records

__all__ = [
    "BadRecord", "PreferenceDataset", "TPOCollator", "TPOConfig", "TPOTrainer", "add_diffusion_noise",
    "load_preference_records",
]


def __getattr__(name):
    if name == "TPOTrainer":
        from tpo_fast.trainer.trainer import TPOTrainer

        return TPOTrainer
    if name == "TPOConfig":
        from tpo_fast.trainer.config import TPOConfig

        return TPOConfig
    raise AttributeError(f"module 'tpo_fast.trainer' has no attribute {name!r}")
