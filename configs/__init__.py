"""The shipped configs (package data, importable as ``haloae.configs``): ``model/``, ``train/``
and ``edge/`` YAML files, found by name with `haloae.named_configs` from any directory after
``pip install``. This file only makes the folder a package; the YAML files are the content.
"""
