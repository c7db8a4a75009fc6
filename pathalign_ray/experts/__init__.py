"""The experts' step: judging synthetic images and keeping their verdicts (the paper's labelling function Gamma).

checklist (the six criteria and each cell type's ranges), pathologist (the simulated pathologist: Gamma by
the checklist, on cell_segmentation and cell_measurement), simulated_feedback (simulated experts label a
run's samples), feedback (the durable store of verdicts that every expert writes to and the reward model
reads), labeling (the page and Serve app where a human pathologist gives verdicts), agreement (how much
the experts agree: Cohen's and Fleiss' kappa). Nothing heavy is imported here.
"""
