"""EditStream, the one engine every batch goes through (no Lightning)."""

import copy

import torch
from conftest import FAST_RESIDUAL, counterfactual_requests

from lightning_edit import Editor
from lightning_edit.engine.arch import ModelAdapter


def _weights(model, layers=(1, 2)):
    ad = ModelAdapter(model)
    return {l: ad.weight_as_linear(l).detach().clone() for l in layers}


def test_replica_starts_fresh_with_the_same_method(trained_gpt2, tokenizer, corpus_file, tmp_path):
    """A replica edits another copy of the base model with the same method and settings, from an
    empty ledger and an empty K_p K_p^T: its first batch equals the original stream's first."""
    ed = Editor(copy.deepcopy(trained_gpt2), tokenizer, layers=[1, 2], method="alphaedit", residual=FAST_RESIDUAL,
                context_prefixes=0, method_kwargs={"l2": 1.0, "threshold_mode": "relative"},
                stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 600, "max_length": 64,
                       "cache_dir": str(tmp_path / "stats")})
    reqs = counterfactual_requests(6)
    ed.apply(reqs[:3])
    after_first = _weights(ed.model)
    ed.apply(reqs[3:])
    stream = ed.stream
    assert stream.position == 2 and stream.num_edits == 6 and set(stream.method.prev_kkt) == {1, 2}

    base = copy.deepcopy(trained_gpt2)
    replica = stream.replica(ModelAdapter(base))
    assert replica.position == 0 and replica.method.prev_kkt == {} and replica.method is not stream.method
    assert replica.method.projectors is stream.method.projectors  # the statistics are shared, not recomputed
    record = replica.apply(reqs[:3])
    assert record.index == 0 and record.request_ids == [r.case_id for r in reqs[:3]]
    for l, w in _weights(base).items():
        assert torch.equal(w, after_first[l]), l
    assert stream.position == 2 and set(stream.method.prev_kkt) == {1, 2}  # the original is untouched
    assert stream.history()[0]["descriptions"] == [r.describe() for r in reqs[:3]]
