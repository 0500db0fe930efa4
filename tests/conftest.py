"""Test-session settings."""

import torch._inductor.config

# The compiled-graph caches on disk outlive a rebuild of the extension, and their keys do not
# see a change in an operator's kernels or fake kernels: a stale entry would then be reused.
torch._inductor.config.force_disable_caches = True
