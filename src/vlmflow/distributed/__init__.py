"""Running experiments on a Ray cluster: many model replicas, one resumable run directory.

Ray is an optional dependency (``pip install 'vlmflow[ray]'``); importing this package does not
import it. The entry points:

* :func:`execute` runs a :class:`~vlmflow.experiments.runner.RunSpec` in this process or, given
  :class:`RayOptions`, on Ray; the CLI's ``--ray`` goes through it.
* :class:`RayExecutor` keeps one cluster connection and one pool of model replicas across several
  runs (e.g. the tasks of a study for one model): ``with RayExecutor(options) as ex: ex.run(spec, out)``.

A Ray run writes exactly what a single-process run writes, into the same run directory (the name
and ``spec.json`` identity are the same), so either can resume the other.
"""

from __future__ import annotations

from vlmflow.distributed.cluster import RayOptions, RayTarget
from vlmflow.distributed.executor import RayExecutor, execute

__all__ = ["RayExecutor", "RayOptions", "RayTarget", "execute"]
