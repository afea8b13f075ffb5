"""``loc3r-eval --ray [ADDRESS]``: the same evaluation on a Ray cluster.

One actor per GPU (or per CPU slot without GPUs) holds a pipeline. Videos, with all their
questions, are handed to idle actors, so each video is encoded once for all its questions.
The driver appends each video's predictions to ``predictions.jsonl`` as they come back: an
actor that dies loses only its video in flight, which goes to a new actor; a driver that
dies leaves a log that the next run resumes. Scores come from the predictions by item key,
so they equal the single-process run's (up to float rounding between processes).

The model folder and the videos must be readable at the same paths on every node.
"""

from __future__ import annotations

import sys
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loc3r.eval.dataset import Item
from loc3r.errors import InputError, InternalError, Loc3rError
from loc3r.owned_folder import OwnedFolder

MAX_ATTEMPTS = 3  # per video: a video whose actor dies this often stops the run
ACTOR_PREFIX = "loc3r-eval-"


@dataclass(frozen=True)
class EvalSettings:
    model: str
    backend: str
    frames: int | None
    max_new_tokens: int


class EvalWorker:
    """A pipeline on one Ray worker; answers all the questions of one video per call."""

    def __init__(self, settings: EvalSettings) -> None:
        from loc3r.eval.cli import load_pipeline
        from loc3r.runtime.generate import SamplingConfig

        self.settings = settings
        self.pipeline = load_pipeline(settings.model, settings.backend)
        self.sampling = SamplingConfig(max_new_tokens=settings.max_new_tokens)

    def model_info(self) -> Any:
        return self.pipeline.model_info

    def answer(self, items: list[Item]) -> list[dict[str, Any]]:
        from loc3r.eval.cli import prediction_record

        records = []
        for item in items:
            try:
                answer = self.pipeline.ask(str(item.video), item.question, item.situation, self.sampling, num_frames=self.settings.frames)
            except Loc3rError as exc:
                raise type(exc)(f"item {item.key!r} (dataset line {item.line}): {exc.problem}", exc.fix) from exc
            records.append(prediction_record(item, answer))
        self.pipeline.forget_video()
        return records


def connect(address: str) -> Any:
    """Ray, initialised: the running session, a local cluster (``local``) or ``ADDRESS``."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray", "pip install 'loc3r[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    return ray


def worker_slots(ray: Any, requested: int | None) -> tuple[int, dict[str, float]]:
    """How many actors, and what each asks for: a GPU each when the cluster has GPUs, else a CPU."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    each = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    return max(1, requested or gpus or cpus), each


def answer_items_on_ray(todo: list[Item], args: Any, folder: OwnedFolder, run: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Answer ``todo`` on the cluster, appending predictions to OUT/predictions.jsonl per video."""
    from loc3r.eval.cli import PREDICTIONS, record_model, show_progress, write_record
    from loc3r.models.tiny import resolve_model

    resolve_model(args.model)  # a wrong --model is refused here, not in every worker
    ray = connect(args.ray)
    count, resources = worker_slots(ray, args.ray_workers)
    videos: dict[Path, list[Item]] = {}
    for item in todo:
        videos.setdefault(item.video, []).append(item)
    pending = deque(videos.values())
    actor_class = ray.remote(max_restarts=0)(EvalWorker)
    settings = EvalSettings(str(args.model), args.backend, args.frames, args.max_new_tokens)
    run_id, made = uuid.uuid4().hex[:8], 0

    def new_actor() -> Any:
        nonlocal made
        made += 1
        return actor_class.options(name=f"{ACTOR_PREFIX}{run_id}-{made}", **resources).remote(settings)

    actors = [new_actor() for _ in range(min(count, len(pending)))]
    attempts: dict[Path, int] = {}
    in_flight: dict[Any, tuple[Any, list[Item]]] = {}
    done = 0

    def dispatch(actor: Any) -> None:
        if pending:
            group = pending.popleft()
            attempts[group[0].video] = attempts.get(group[0].video, 0) + 1
            in_flight[actor.answer.remote(group)] = (actor, group)

    try:
        run = record_model(folder, run, ray.get(actors[0].model_info.remote()))
        for actor in actors:
            dispatch(actor)
        with folder.appender(PREDICTIONS) as log:
            while in_flight:
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                actor, group = in_flight.pop(ref)
                try:
                    answered = ray.get(ref)
                except ray.exceptions.RayActorError:
                    actor = replace_dead(actor, group, attempts, pending, new_actor)
                    actors.append(actor)
                except ray.exceptions.RayTaskError as exc:
                    raise exc.cause if isinstance(exc.cause, Loc3rError) else InternalError(f"a Ray worker failed: {exc.cause!r}") from None
                else:
                    for record in answered:
                        write_record(log, record)
                        records[record["key"]] = record
                    done += len(answered)
                    show_progress(done, len(todo), group[0].video.name)
                dispatch(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
    return run


def replace_dead(actor: Any, group: list[Item], attempts: dict[Path, int], pending: deque[list[Item]], new_actor: Any) -> Any:
    """Put a dead actor's video back at the front of the queue; a new actor to take it."""
    from loc3r.eval.cli import PROG

    video = group[0].video
    if attempts[video] >= MAX_ATTEMPTS:
        raise InternalError(f"Ray workers died {MAX_ATTEMPTS} times on {video}", "check the workers' memory and logs")
    print(f"{PROG}: a Ray worker died while on {video.name}; its {len(group)} questions go to a new worker", file=sys.stderr)
    pending.appendleft(group)
    return new_actor()
