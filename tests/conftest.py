"""Test-session settings."""

import torch
import torch._inductor.config

# The compiled-graph caches on disk outlive a rebuild of the extension, and their keys do not
# see a change in an operator's kernels or fake kernels: a stale entry would then be reused.
torch._inductor.config.force_disable_caches = True

# Strict float32 on both sides of every comparison: torch.nn's cuDNN RNNs may use TF32 for
# float32 by default, which is ~1e-3 off, far outside the float32 tolerance.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
