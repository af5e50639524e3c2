"""Causal tracing (``lightning-edit trace``): where a model recalls its facts, so the edit
layers and the anchor token can be chosen from measurements.

* :mod:`.core`: facts, noise, the restoration of one state, one fact's trace, the role tables
  and the recommendation;
* :mod:`.result`: :class:`TraceResult` (tables, heat map, Markdown, JSON) and :func:`load_trace`;
* :mod:`.run`: :func:`run_trace`, a whole trace over a sample of facts;
* :mod:`.cli`: the command line.
"""

from lightning_edit.trace.core import Fact, FactTrace, Recommendation, recommend, trace_fact
from lightning_edit.trace.result import TraceResult, load_trace
from lightning_edit.trace.run import run_trace, sample_facts

__all__ = ["Fact", "FactTrace", "Recommendation", "TraceResult", "load_trace", "recommend", "run_trace", "sample_facts", "trace_fact"]
