"""How ranks are started and fed: the Python API (``longquest.LLM``), the ``longquest``
command line, the torchrun entry, Ray actors, and batch jobs.

The only package that imports ray or reads argv and environment variables; its modules
are imported where they are used, so importing this package starts nothing and imports
no ray.
"""
