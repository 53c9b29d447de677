"""drope's attention as a kernel repository for transformers' continuous batching (see drope/hf/batching.py): the
``kernels`` package loads this directory through ``LOCAL_KERNELS`` (drope.hf.continuous_batching_attention()).
What it exposes depends on the installed transformers (``repository_exports``)."""

from drope.hf.batching import repository_exports

globals().update(repository_exports())
