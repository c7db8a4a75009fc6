"""The labelling page a human pathologist judges samples on: app (FastAPI, static/index.html), serve (on Ray Serve)."""
