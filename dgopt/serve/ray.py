"""The same app as a Ray Serve deployment: N replicas, each loading the artifact and running its own decode worker,
behind Ray's HTTP proxy. The servers hold no state between requests, so any replica can take any request.

    dgopt serve ARTIFACT --ray --replicas 2 --port 8000          # a local Ray instance, or RAY_ADDRESS's cluster

or in Python / a `serve run` config: `app = dgopt.serve.ray.build(artifact, replicas=2)`. On a cluster, every
node must reach ARTIFACT at the same path and have dgopt installed."""
from __future__ import annotations

import signal
import time

from ray import serve

__all__ = ["DgoptDeployment", "build", "run"]


@serve.ingress()
class DgoptDeployment:
    """One replica: the FastAPI app of `dgopt serve` (built on the replica, after the constructor)."""

    def __init__(self, artifact: str, max_batch: int | None = None, model_name: str | None = None,
                 device: str | None = None, threads: int | None = None, stream_interval: float = 0.0,
                 continuous: bool = True):
        self._args = (artifact, max_batch, model_name, device, threads, stream_interval, continuous)

    def __serve_build_asgi_app__(self):
        from .app import create_app
        artifact, max_batch, model_name, device, threads, interval, continuous = self._args
        return create_app(artifact, max_batch=max_batch, model_name=model_name, device=device, threads=threads,
                          stream_interval=interval, continuous=continuous)


def build(artifact: str, replicas: int = 1, max_batch: int | None = None, model_name: str | None = None,
          device: str | None = None, threads: int | None = None, num_cpus: float = 1.0, stream_interval: float = 0.0,
          continuous: bool = True):
    """The bound application (for `serve.run`). Each replica batches its own requests, so it may hold several
    batches' worth of requests at once (max_ongoing_requests)."""
    from pathlib import Path
    from ..artifact import read_manifest
    cap = read_manifest(Path(artifact))["target"]["max_batch"]
    dep = serve.deployment(DgoptDeployment, name="dgopt", num_replicas=replicas,
                           max_ongoing_requests=8 * (max_batch or cap),
                           ray_actor_options={"num_cpus": num_cpus})
    return dep.bind(str(Path(artifact).resolve()), max_batch, model_name, device, threads, stream_interval,
                    continuous)


def run(artifact: str, host: str, port: int, replicas: int, **kw) -> int:
    """`dgopt serve --ray`: start (or join) Ray, deploy, serve until Ctrl-C."""
    import ray
    ray.init(ignore_reinit_error=True, log_to_driver=False)

    def stop(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)         # a service manager's stop: shut Serve and Ray down as Ctrl-C does
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(artifact, replicas, **kw), name="dgopt", route_prefix="/")
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
        return 130
    print(f"serving {artifact} with {replicas} Ray Serve replicas at http://{host}:{port}/v1 (Ctrl-C to stop)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
