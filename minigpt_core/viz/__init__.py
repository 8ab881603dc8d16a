"""Figures and pages: matplotlib images (headless) and self-contained HTML that works offline.

Every command that draws (``plot``, ``report``, ``attention``, ``eval --per-token``) goes through
this package, so figures share one style and one way of being written.

The training layer, beside train and inspection. May import the layers below (assembly down to base).
"""
