"""The engines: a rank's data plane behind one seam (``base.Engine``), one module per engine.

``shm`` serves the tiny float32 model over the host shared-memory transport (CPU); ``gpu`` serves the
bench model in bf16 with CUDA-graph decode steps over the fused GPU buffer or a collective baseline.
``base.make_engine`` picks one by ``RuntimeConfig.engine``; importing this package imports no CUDA package.
"""
