"""Ray mode (extra ``ray``): the ingest pipeline as a Ray Data streaming job.

    files ──map (CPU tasks: hash, page count)──► driver: dedup + resume filter
    pages ──map_batches(render_rows) (CPU tasks)──► map_batches(RayTranscriber) (actor pool, N actors,
          one HD4K each, num_gpus=1 when the cluster has GPUs)──► map_batches(write_shard_rows) (tasks:
          each engine batch becomes one whole shard at once, so a kill loses only pages in flight)
          ──► driver: progress and the failure watch from the shard summaries

The driver only sees file descriptions and shard summaries, never pixels or text. It starts a local
Ray (``address=None``) or joins a cluster (``address="auto"``, ``"ray://head:10001"``...); a Ray that is
already initialised in this process is used as it is and left running. On a cluster, the inputs and
``out`` must be on storage every node sees (the same paths).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from hd4k_tools.errors import IngestError, MissingDependencyError
from hd4k_tools.ingestion.corpus import FileInfo, describe_file
from hd4k_tools.ingestion.local import DEFAULT_MAX_CONSECUTIVE_FAILURES, FailureWatch
from hd4k_tools.ingestion.progress import IngestProgress
from hd4k_tools.ingestion.records import PageRecord, RecordError
from hd4k_tools.ingestion.shards import ShardWriter, records_from, write_shard
from hd4k_tools.ingestion.work import EngineSpec, PageSettings, RayTranscriber, WorkPlan, render_rows
from hd4k_tools.inputs.pdf import PageSpec
from hd4k_tools.inputs.policy import ImagePolicy

# A rendering task asks for less than the actors' CPU, so Ray Data keeps rendering in its own tasks (it
# fuses map steps with equal resources into the actor), overlapping it with transcription.
RENDER_CPUS = 0.5
#: Seconds to wait for a Ray cluster's head to answer before giving up on joining it.
JOIN_TIMEOUT_S = 5.0


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise MissingDependencyError(
            'Ray mode needs Ray Data, which is not installed; pip install "hd4k-tools[ray]" (or drop --ray).'
        ) from err
    return ray


def _join_error(address: str, detail: str) -> IngestError:
    return IngestError(
        f"cannot join the Ray cluster at {address!r}: {detail}; start it with 'ray start --head' on the head node, "
        "check the address (or RAY_ADDRESS), and where the cluster uses token authentication set RAY_AUTH_MODE=token "
        "and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)."
    )


def _head_address(address: str) -> tuple[str, str]:
    """The ``host:port`` that ``address`` leads to, and where it came from (for the error message)."""
    if address.startswith("ray://"):
        return address.removeprefix("ray://").split("/")[0], "the address given"
    if address != "auto":
        return address, "the address given"
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        return env.removeprefix("ray://").split("/")[0], "RAY_ADDRESS"
    from ray._private.utils import get_ray_address_file, read_ray_address

    found = read_ray_address(None)
    if not found:
        raise _join_error(address, "no running Ray cluster was found on this node (no 'ray start' here)")
    return found, f"the cluster file {get_ray_address_file(None)}, left by the last 'ray start' on this node"


def check_reachable(address: str, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Refuse at once a cluster address whose head does not answer, instead of Ray's minutes of retries.

    Raises:
        IngestError: nothing answers at the head's address (one line: the address and where it came from).
    """
    head, origin = _head_address(address)
    host, _, port = head.rpartition(":")
    if not host or not port.isdigit():
        raise _join_error(address, f"{head!r} (from {origin}) is not host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        stale = " (a stale cluster file? 'ray stop' removes it)" if "cluster file" in origin else ""
        raise _join_error(
            address, f"nothing answers at {head} (from {origin}{stale}) within {timeout_s:g} s: {err.strerror or err}"
        ) from err


@contextmanager
def ray_session(address: str | None, workers: int):
    """Use the Ray of this process, join ``address``, or start a local Ray sized for ``workers`` actors
    (a Ray this call started or joined is shut down at the end)."""
    ray = _ray()
    if ray.is_initialized():
        yield
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise _join_error(address, " ".join(str(err).split())[:300]) from err
    else:
        # Logical CPUs: one per actor plus the machine's cores for rendering and writing, so the actor
        # pool can never take every CPU slot and starve the rendering tasks it waits for.
        cores = os.cpu_count() or 1
        ray.init(address="local", num_cpus=cores + workers, include_dashboard=False, **quiet)
    ray.data.DataContext.get_current().enable_progress_bars = False  # hd4k's own progress line instead
    try:
        yield
    finally:
        ray.shutdown()


def _describe_row(row: Mapping[str, Any], pages: PageSpec, policy: ImagePolicy) -> dict[str, Any]:
    # Paths travel as JSON: a name that is not UTF-8 is not a valid Arrow string.
    info = describe_file(json.loads(row["source"]), pages, policy)
    return {"index": row["index"], "info": json.dumps(info.to_row())}


def describe_files(paths: Sequence[str], pages: PageSpec, policy: ImagePolicy) -> list[FileInfo]:
    """Hash and count the pages of every file, as Ray tasks."""
    ray = _ray()
    if not paths:
        return []
    items = [{"index": i, "source": json.dumps(p)} for i, p in enumerate(paths)]
    ds = ray.data.from_items(items, override_num_blocks=min(len(paths), 64))
    ds = ds.map(_describe_row, fn_kwargs={"pages": pages, "policy": policy})
    rows = sorted(ds.take_all(), key=lambda row: int(row["index"]))  # the order given: first path wins
    return [FileInfo.from_row(json.loads(row["info"])) for row in rows]


def write_shard_rows(batch: Mapping[str, Any], out: str) -> dict[str, list[Any]]:
    """Ray ``map_batches`` step: one batch of record lines becomes one shard; returns its summary."""
    records: list[PageRecord] = records_from(str(line) for line in batch["record"])
    name = write_shard(out, records)
    errors = [r.error.model_dump() for r in records if r.error is not None]
    ok = len(records) - len(errors)
    return {"shard": [name], "pages": [len(records)], "ok": [ok], "errors": [json.dumps(errors)]}


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
    tally: ShardWriter,
    *,
    workers: int,
    batch_size: int,
    progress: IngestProgress,
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES,
) -> None:
    """Run ``plan`` on Ray, each engine batch written as one shard into ``tally.out`` as soon as it is
    transcribed; ``tally`` keeps the counts and shard names as the shards arrive.

    Raises:
        SystemicFailureError: pages keep failing the same retryable way.
    """
    ray = _ray()
    tally.add(plan.failed_files)
    tally.close()
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
    # One shard per engine batch: a page is on disk as soon as its batch is transcribed.
    ds = ds.map_batches(
        write_shard_rows, fn_kwargs={"out": str(tally.out)}, batch_size=batch_size, batch_format="numpy"
    )
    watch = FailureWatch(max_consecutive_failures)
    for row in ds.iter_rows():
        tally.written.append(str(row["shard"]))
        errors = [RecordError(**e) for e in json.loads(str(row["errors"]))]
        tally.ok += int(row["ok"])
        tally.failed += len(errors)
        tally.errors.update(e.type for e in errors)
        progress.update(int(row["pages"]))
        stand_ins = [_error_record(e) for e in errors] + [_OK] * int(row["ok"])
        watch.see(stand_ins)


_OK = PageRecord(key="", source="", content_hash="", page=None, page_count=None, model="")


def _error_record(error: RecordError) -> PageRecord:
    return _OK.model_copy(update={"error": error})
