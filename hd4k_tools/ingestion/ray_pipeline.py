"""Ray mode (extra ``ray``): the ingest pipeline as a Ray Data streaming job.

    files ──map (CPU tasks: hash, page count)──► driver: dedup + resume filter
    pages ──map_batches(render_rows) (CPU tasks)──► map_batches(RayTranscriber) (actor pool, N actors,
          one HD4K each, num_gpus=1 when the cluster has GPUs)──► map_batches(write_shard_rows) (tasks:
          each batch becomes one atomic shard)──► driver: progress from the shard summaries

The driver only sees file descriptions and shard summaries, never pixels or text. It starts a local
Ray (``address=None``) or joins a cluster (``address="auto"``, ``"ray://head:10001"``...); a Ray that is
already initialised in this process is used as it is and left running. On a cluster, the inputs and
``out`` must be on storage every node sees (the same paths).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from hd4k_tools.errors import IngestError, MissingDependencyError
from hd4k_tools.ingestion.corpus import FileInfo, describe_file
from hd4k_tools.ingestion.local import ShardBuffer
from hd4k_tools.ingestion.progress import IngestProgress
from hd4k_tools.ingestion.records import PageRecord
from hd4k_tools.ingestion.shards import records_from, write_shard
from hd4k_tools.ingestion.work import EngineSpec, PageSettings, RayTranscriber, WorkPlan, render_rows
from hd4k_tools.inputs.pdf import PageSpec
from hd4k_tools.inputs.policy import ImagePolicy

# A rendering task asks for less than the actors' CPU, so Ray Data keeps rendering in its own tasks (it
# fuses map steps with equal resources into the actor), overlapping it with transcription.
RENDER_CPUS = 0.5


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise MissingDependencyError(
            'Ray mode needs Ray Data, which is not installed; pip install "hd4k-tools[ray]" (or drop --ray).'
        ) from err
    return ray


@contextmanager
def ray_session(address: str | None, workers: int):
    """Use the Ray of this process, join ``address``, or start a local Ray sized for ``workers`` actors
    (a Ray this call started or joined is shut down at the end)."""
    ray = _ray()
    if ray.is_initialized():
        yield
        return
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise IngestError(
                f"cannot join the Ray cluster at {address!r} ({' '.join(str(err).split())[:300]}); start it with "
                "'ray start --head' on the head node, check the address (or RAY_ADDRESS), and where the cluster uses "
                "token authentication set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)."
            ) from err
    else:
        # Logical CPUs: one per actor plus the machine's cores for rendering and writing, so the actor
        # pool can never take every CPU slot and starve the rendering tasks it waits for.
        cores = os.cpu_count() or 1
        ray.init(address="local", num_cpus=cores + workers, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _describe_row(row: Mapping[str, Any], pages: PageSpec, policy: ImagePolicy) -> dict[str, str]:
    info = describe_file(str(row["source"]), pages, policy)
    return {"info": json.dumps(info.to_row())}


def describe_files(paths: Sequence[str], pages: PageSpec, policy: ImagePolicy) -> list[FileInfo]:
    """Hash and count the pages of every file, as Ray tasks."""
    ray = _ray()
    if not paths:
        return []
    ds = ray.data.from_items([{"source": p} for p in paths], override_num_blocks=min(len(paths), 64))
    ds = ds.map(_describe_row, fn_kwargs={"pages": pages, "policy": policy})
    return [FileInfo.from_row(json.loads(row["info"])) for row in ds.take_all()]


def write_shard_rows(batch: Mapping[str, Any], out: str) -> dict[str, list[Any]]:
    """Ray ``map_batches`` step: one batch of record lines becomes one shard; returns its summary."""
    records: list[PageRecord] = records_from(str(line) for line in batch["record"])
    name = write_shard(out, records)
    failed = sum(1 for r in records if r.error is not None)
    return {"shard": [name], "pages": [len(records)], "failed": [failed]}


def _actor_resources(ray: Any, spec: EngineSpec, workers: int) -> tuple[dict[str, float], int]:
    """Ray resources of one transcription actor, and the torch threads it may use (0: torch's default)."""
    if spec.engine == "remote":  # the model runs elsewhere: actors only wait on HTTP
        return {"num_cpus": 0.5}, 0
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_cpus": 1, "num_gpus": 1}, 0
    # CPU only, one machine (a local Ray): the actors split its cores instead of each taking all of them.
    single_node = len([n for n in ray.nodes() if n.get("Alive")]) == 1
    threads = max(1, (os.cpu_count() or 1) // workers) if single_node else 0
    return {"num_cpus": 1}, threads


def run_ray(
    plan: WorkPlan,
    spec: EngineSpec,
    settings: PageSettings,
    tally: ShardBuffer,
    *,
    workers: int,
    batch_size: int,
    progress: IngestProgress,
) -> None:
    """Run ``plan`` on Ray, writing shards of ``tally.shard_size`` records into ``tally.out``; ``tally``
    keeps the counts and shard names as the shards arrive."""
    ray = _ray()
    tally.add(plan.failed_files)
    tally.flush()
    progress.update(len(plan.failed_files))
    if not plan.tasks:
        return
    resources, threads = _actor_resources(ray, spec, workers)
    blocks = max(1, -(-len(plan.tasks) // batch_size))
    ds = ray.data.from_items([{"task": t.to_json()} for t in plan.tasks], override_num_blocks=blocks)
    ds = ds.map_batches(
        render_rows,
        fn_kwargs={"settings": settings},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=RENDER_CPUS,
    )
    ds = ds.map_batches(
        RayTranscriber,
        fn_constructor_kwargs={"spec": spec, "settings": settings, "torch_threads": threads},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        **resources,
    )
    ds = ds.map_batches(
        write_shard_rows, fn_kwargs={"out": tally.out}, batch_size=tally.shard_size, batch_format="numpy"
    )
    for row in ds.iter_rows():
        tally.written.append(str(row["shard"]))
        tally.failed += int(row["failed"])
        tally.ok += int(row["pages"]) - int(row["failed"])
        progress.update(int(row["pages"]))
