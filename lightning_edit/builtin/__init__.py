"""The built-in resources (no hub, no internet): the offline fact world, the real SmolLM2 model,
real facts it knows, statistics corpora, and tiny toy models for tests. Importing this package
registers their name prefixes with :mod:`lightning_edit.resources`."""

from lightning_edit.builtin import corpora, hfmodels, realfacts
from lightning_edit.builtin.factworld import resource as factworld_resource
from lightning_edit.resources import register

register(factworld_resource.PREFIX, factworld_resource.resolve)
register(hfmodels.PREFIX, hfmodels.resolve)
register(realfacts.PREFIX, realfacts.resolve)
register(corpora.PREFIX, corpora.resolve)
