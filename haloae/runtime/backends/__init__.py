"""One module per backend; each registers its class with ``haloae.runtime.registry.register``.

Modules here are imported by the registry at start (cheap: numpy only at module level); the
inference library of a backend is imported when that backend is built.
"""
