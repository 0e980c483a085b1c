"""fastai: the EMA callbacks, Learner save/load with the EMA (single file and sharded), the post-hoc sweep.

Importing this package patches `Learner.save`/`Learner.load` (fastai's `@patch` style); they
behave as fastai's own whenever no EMA callback is attached.
"""

from .bema import BEMACallback
from .callbacks import EMACallback, EMASchedule
from .posthoc import PostHocEMACallback, posthoc_sweep

__all__ = ["BEMACallback", "EMACallback", "EMASchedule", "PostHocEMACallback", "posthoc_sweep"]
