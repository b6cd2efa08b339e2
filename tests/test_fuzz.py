"""Mutation fuzzing over the whole nvidia-smi corpus (tests/fuzzing.py): 10,000 cases, fixed seed.

Counts what issue 8 asks for: no exception escapes the reader, no impossible or duplicate value
is accepted, nothing the unmutated output showed is lost without a warning, and text a user
writes (command lines) changes nothing but a warning about command lines. A bigger run with
other seeds: ``python bench/fuzz.py --cases 200000 --seed N``.
"""

from __future__ import annotations

from fuzzing import Fuzz, _read, seeds

CASES = 10_000
SEED = 20260814


def test_corpus_seeds_read_cleanly() -> None:
    """The unmutated seeds: every probe output built from a GPU capture is an ok host without
    warnings; every error capture is a failed host of its own kind."""
    corpus = seeds()
    assert len(corpus) >= 60
    for seed in corpus:
        result, problems = _read(seed)
        assert problems == [], seed.name
        if seed.kind == "probe" and seed.name.endswith(".txt"):  # an error capture
            assert not result.ok, seed.name  # type: ignore[union-attr]
        elif seed.name == "probe:overflow":  # a streaming nvidia-smi cut on the host
            assert not result.ok and "printed more than 4 MiB" in (result.error or ""), result  # type: ignore[union-attr]
        elif seed.kind == "probe":
            assert result.ok and result.warnings == () and result.gpus, (seed.name, result)  # type: ignore[union-attr]


def test_fuzz_10000_mutated_outputs() -> None:
    fuzz = Fuzz().run(CASES, SEED)
    summary = fuzz.summary()
    assert fuzz.cases == CASES
    assert fuzz.exceptions == 0, summary
    assert fuzz.impossible == 0, summary
    assert fuzz.silent_losses == 0, summary
    assert fuzz.injection_changes == 0, summary
    assert fuzz.injections > 200, summary  # the run did try user-written text
    # every kind of mutation was tried, and the outcomes cover failed, warned and clean hosts
    assert min(fuzz.mutations.values()) > 200 and len(fuzz.mutations) == 10, summary
    assert {o.split(":")[0] for o in fuzz.outcomes} >= {"ok", "failed"}, summary
