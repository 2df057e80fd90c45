"""Looking at a build before training on it: decoded samples (``show``), figures (``figures`` for the
numbers, ``plot`` for the drawing) and a self-contained HTML page (``report``).

Everything here reads a complete build only (``sptok.json`` present) and never writes into it.
"""
