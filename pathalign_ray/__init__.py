"""pathalign_ray: align medical image generators with expert judgement, on Ray.

Grouped by the paper's steps:
    data/          the real images and the Parquet data set every job reads
    generator/     the generator (pixel or latent diffusion, LoRA), pretraining, sampling, finetuning
                   with the reward and its objectives, a new concept (Algorithm 4)
    experts/       the checklist, the simulated pathologist, human labelling, the feedback store, agreement
    reward/        the reward model: training, serving on Ray Serve, the reward functions
    evaluation/    fidelity, diversity, utility and plausibility of generators
    tune/          the feedback-weight search on Ray Tune
The loop and what every step shares: align (the closed loop), demo and demo_report (`make demo`), cluster
and local_cluster (reaching Ray, DeepSpeed's settings), training (around every Ray Train worker's
objective), config, storage (local paths and object storage), images, metrics, progress.

The package root imports nothing heavy; import the submodules you need.
"""

__version__ = "0.1.0"
