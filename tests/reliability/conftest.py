"""Reliability suite: the long ``stress`` variants are deselected by default (``addopts = -m 'not stress'`` in
pyproject.toml), so ``make test`` runs the bounded forms; ``make test-stress`` (``pytest -m stress``) runs the
long ones."""
