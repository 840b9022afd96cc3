"""Where a datalist's pairs run: one after another in this process, or as Ray tasks on a local or remote cluster."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import Dataset

from common.io import RegistrationInputError

__all__ = ["RayExecutor", "outputs_complete", "pair_executor"]

logger = logging.getLogger(__name__)


def outputs_complete(folder: str | Path) -> bool:
    """Whether ``folder`` holds one run's complete outputs: its ``metrics.json`` (written last) and every file it
    lists under ``outputs``."""
    metrics = Path(folder) / "metrics.json"
    try:
        names = json.loads(metrics.read_text()).get("outputs", [])
    except (OSError, ValueError):
        return False
    return bool(names) and all((Path(folder) / name).is_file() for name in names)


def _register_pair(components: Mapping[str, Any], item: Mapping[str, Any], threads: int) -> dict[str, Any]:
    """Register one datalist pair with a fresh serial evaluator (in a Ray worker): its summary row, also on failure."""
    from .evaluator import RegistrationEvaluator

    torch.set_num_threads(threads)
    parts = dict(components)
    dataset = Dataset([dict(item)], transform=parts.pop("transform"))
    evaluator = RegistrationEvaluator(dataset=dataset, **parts)
    out = Path(parts["output_dir"]) / item["id"]
    try:
        evaluator.run()
    except RegistrationInputError as error:
        cause = evaluator.failures[0][1] if evaluator.failures else error
        return {"id": item["id"], "status": "failed", "error": str(cause), "output_dir": str(out)}
    except Exception as error:  # out of memory, a crash of the method: recorded, the other pairs go on
        return {
            "id": item["id"],
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "output_dir": str(out),
        }
    output = evaluator.state.output
    return {"id": item["id"], "status": "ok", "metrics": output["metrics"], "output_dir": str(out)}


class RayExecutor:
    """Registers the pairs of a datalist as Ray tasks, each on its own fresh evaluator built from the running one's
    parts, writing into ``output_dir/<pair id>/`` as a serial run does. Pairs whose outputs are already complete are
    not registered again.

    Args:
        address: a running cluster's address (``ray start --head`` prints it; ``"auto"`` finds one on this node), or
            ``""`` to start a local Ray on the spot.
        cpus_per_pair: CPUs each pair's task requests, and its torch threads.
        num_cpus: the CPUs of a local Ray started here (None: all of this machine's).
    """

    def __init__(self, address: str = "", cpus_per_pair: int = 1, num_cpus: int | None = None) -> None:
        if cpus_per_pair < 1:
            raise ValueError(f"cpus_per_pair must be at least 1, got {cpus_per_pair}.")
        self.address, self.cpus_per_pair, self.num_cpus = address, int(cpus_per_pair), num_cpus

    def _connect(self) -> Any:
        try:
            import ray
        except ImportError:
            raise RegistrationInputError(
                "--executor ray needs Ray: pip install -e '.[distributed]' (or pip install 'ray[default]')"
            ) from None
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
        return ray

    def submit(
        self, components: Mapping[str, Any], items: Sequence[Mapping[str, Any]], device: torch.device
    ) -> list[Any]:
        """Start one task per pair of ``items`` (datalist entries with ``id``); complete ones get their row at once.

        Returns, per item, a Ray object reference to its summary row or the row itself."""
        ray = self._connect()
        resources = {"num_cpus": self.cpus_per_pair, "num_gpus": 1 if device.type == "cuda" else 0}
        task = ray.remote(**resources)(_register_pair)
        shared = ray.put(dict(components))
        pending: list[Any] = []
        for item in items:
            folder = Path(components["output_dir"]) / item["id"]
            if outputs_complete(folder):
                metrics = json.loads((folder / "metrics.json").read_text())
                pending.append({"id": item["id"], "status": "ok", "metrics": metrics, "output_dir": str(folder)})
                logger.info(f"{item['id']}: outputs complete in {folder}, not registered again")
            else:
                pending.append(task.remote(shared, dict(item), self.cpus_per_pair))
        return pending

    def result(self, pending: Any) -> dict[str, Any]:
        """The summary row of one submitted pair, waiting for its task."""
        return pending if isinstance(pending, dict) else self._connect().get(pending)


def pair_executor(executor: str, ray_address: str = "", cpus_per_pair: int = 1) -> RayExecutor | None:
    """The executor a bundle's ``--executor`` names: None for ``serial`` (this process), a :class:`RayExecutor` for
    ``ray``."""
    name = str(executor).strip().lower()
    if name == "serial":
        return None
    if name == "ray":
        return RayExecutor(ray_address or "", cpus_per_pair)
    raise RegistrationInputError(f"--executor {executor}: pairs run serial or on ray")
