"""Hosting the labelling page on Ray Serve."""

from __future__ import annotations

from ray import serve

from pathalign_ray.cluster import init_ray, keep_serving
from pathalign_ray.experts.labeling.app import LabelConfig, create_app

APP_NAME = "labeling"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress()
class LabelingPage:
    """One replica serves the page; the feedback store is safe with several, should you add them."""

    def __init__(self, config: LabelConfig):
        self._config = config

    def __serve_build_asgi_app__(self):
        return create_app(self._config)


def start_labeling(config: LabelConfig) -> str:
    """Deploy the page and return its URL. The deployment outlives this call; `serve.delete(APP_NAME)` ends it."""
    init_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(LabelingPage.bind(config), name=APP_NAME, route_prefix=config.route_prefix)
    return f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}/"


def serve_until_interrupted(config: LabelConfig) -> None:
    """jobs/label.py: deploy and print the URL; on a local cluster, keep it up until Ctrl-C."""
    url = start_labeling(config)
    print(f"labelling page: {url} (summary: {url}summary)")
    keep_serving(APP_NAME)
