"""The feedback-weight search on Ray Tune: which objective, weights, lr and steps align the generator best.

config (SearchConfig, its conditional space, each trial's FinetuneConfig), objective (the search's
arithmetic as pure functions), search (the Ray Tune driver: `search`, each trial's `run_trial`), report
(the tables, the Pareto plot and the best config written once the trials end). Nothing is imported here;
`ray.tune` is Ray's, this package is `pathalign_ray.tune`.
"""
