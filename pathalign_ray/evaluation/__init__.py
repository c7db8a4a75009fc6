"""Evaluation of generators the paper's four ways: fidelity, diversity, utility, plausibility.

Modules: metrics (pure numbers: Frechet distance, precision/recall/density/coverage, classifier
scores, Wilson intervals), classifier (the small CNN of the domain encoder and the utility score),
features (the cached domain encoder, InceptionV3 from a local file), plausibility (rates per class
and criterion), sources (what is read), report (what is written), evaluate (the Ray driver:
`EvaluateConfig`, `evaluate`), probe (the Tune search's quick plausibility, FID and coverage of a
model, on the evaluation's encoder, features and metrics). Nothing heavy is imported here.
"""
