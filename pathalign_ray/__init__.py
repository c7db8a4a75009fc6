"""pathalign_ray: align medical image generators with expert judgement, on Ray.

The package root imports nothing heavy; import the submodules you need.
"""

__version__ = "0.1.0"
