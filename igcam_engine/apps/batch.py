"""`igcam batch`: explain every image of a folder with Ray Data, on this machine or on a Ray cluster.

The images of a local folder are read by the driver into Ray's object store, a URI's by Ray Data's binary-file
reader on whichever node reads it; Ray actors, as many as the cluster has CPUs unless --actors says otherwise, each hold one
Explainer built from the bundle shipped through the object store, and explain a batch of images per engine call.
Every image gets the files `igcam explain` writes (overlays, raw maps) plus <stem>.json, written last into the output
location (a local folder or a filesystem URI, see igcam_engine.apps.storage): an image whose record exists there is
done, so a rerun resumes where the last one stopped, from any machine. A file that cannot be read or explained is
reported, with the reason, in failures.json, <stem>.failed.json and at the end, and does not stop the others;
reruns skip it unless asked to retry failures.
"""
from __future__ import annotations

import json
import logging
import pickle
from collections import Counter
from dataclasses import asdict
from pathlib import PurePosixPath

import numpy as np

from igcam_engine.apps.arguments import (
    Command,
    add_backend_arguments,
    add_limit_arguments,
    add_method_arguments,
    add_target_arguments,
    backend_options,
    explain_options,
    limits,
    target_choice,
)
from igcam_engine.apps.storage import Location
from igcam_engine.backends import BackendOptions
from igcam_engine.errors import InputError, NotFound, OptionError, UserError
from igcam_engine.options import DEFAULT_LIMITS, ExplainOptions, Limits
from igcam_engine.targets import TargetChoice
from igcam_engine.validators import integer, integer_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


class ExplainImages:
    """A Ray Data actor: the shipped bundle materialized on its node, one Explainer, one engine call per batch of
    images. It returns, per image, its status and the bytes of its output files (record last), which the driver
    writes where the output lives."""

    def __init__(self, shipped: list, output: str, job: dict, backend: BackendOptions, limits: Limits):
        """output: the output location as records name it (Location.shown); job: the checked explain options and
        target choice, and the record's options."""
        import ray

        from igcam_engine import Explainer
        from igcam_engine.apps.cluster import materialize_bundle

        self.explainer = Explainer(materialize_bundle(shipped), **asdict(backend), limits=limits)
        self.output, self.job = output, job
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        from igcam_engine.apps.outputs import explain_images, render_explanation
        from igcam_engine.images import load_image, to_model_input

        names = [PurePosixPath(str(p)).name for p in batch["path"]]
        count = len(names)
        status, messages, kinds, outputs, loaded = ["ok"] * count, [""] * count, [""] * count, [b""] * count, []
        for index, data in enumerate(batch["bytes"]):
            try:
                picture = load_image(bytes(data), self.explainer.limits.pixels, name=f"'{names[index]}'")
                loaded.append((index, picture, *to_model_input(picture, self.explainer.input_shape,
                                                                 self.explainer.preprocess)))
            except UserError as e:
                status[index], messages[index], kinds[index] = "failed", str(e), e.kind
        if loaded:
            images = np.stack([item[2] for item in loaded])
            results = explain_images(self.explainer, images, self.job["targets"], self.job["options"])
            for result, (index, picture, _, shown) in zip(results, loaded):
                if isinstance(result, UserError):
                    status[index], messages[index], kinds[index] = "failed", str(result), result.kind
                    continue
                targets, maps, image_outputs = result
                stem = PurePosixPath(names[index]).stem
                entry, files = render_explanation(stem, picture, shown, maps, targets, image_outputs, self.explainer,
                                                  self.output)
                record = {"image": names[index], "options": self.job["record"], "node": self.node, **entry}
                files[f"{stem}.json"] = (json.dumps(record, indent=2) + "\n").encode()  # last: the image is done
                outputs[index] = pickle.dumps(list(files.items()))
        return {"path": np.array(names), "status": np.array(status), "message": np.array(messages),
                "kind": np.array(kinds), "node": np.array([self.node] * count),
                "outputs": np.array(outputs, dtype=object)}


def pending(source: Location, output: Location, options: dict, retry_failed: bool = False):
    """(images still to explain, images done, images that failed before, images that cannot be read at all): file
    names in the input folder (top level, by suffix). An image is done when its record exists in the output location
    and was made with the same options; otherwise it is explained again. An entry that is no readable file (a
    broken link, a link loop) is reported, never silently skipped."""
    if source.kind() != "folder":
        raise NotFound(f"input folder '{source.shown}' does not exist or is not a folder")
    if output.same_as(source):
        raise OptionError(f"the output folder is the input folder '{source.shown}': the overlays written would be "
                        "explained on the next run; choose another output folder")
    listing = source.files()
    images = sorted(name for name in listing if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES)
    stems = Counter(PurePosixPath(name).stem for name in images)
    duplicates = sorted(stem for stem, n in stems.items() if n > 1)
    if duplicates:
        raise InputError(f"several images share a name ({', '.join(duplicates)}): outputs are named by it; rename them")
    existing = output.files()
    done = [n for n in images if _recorded(output, existing, f"{PurePosixPath(n).stem}.json", options)]
    failed = [n for n in images if not retry_failed and n not in done
              and _recorded(output, existing, f"{PurePosixPath(n).stem}.failed.json", options)]
    unreadable = [n for n in images if listing[n] is None and n not in failed]
    return [n for n in images if n not in done and n not in failed and n not in unreadable], done, failed, unreadable


def _recorded(output: Location, existing: dict, name: str, options: dict) -> bool:
    """Whether a record exists for these options (a record that cannot be read counts as absent)."""
    if name not in existing:
        return False
    try:
        return json.loads(output.read(name)).get("options") == options
    except (OSError, ValueError, AttributeError):
        return False


def actor_count(ray, requested, batches: int) -> int:
    """Actors to start: one per CPU of the cluster (each takes one), --actors as a cap, never more than batches."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(cpus if requested is None else requested, cpus, batches))


def images_per_call(ray, requested_actors, images: int, batch_size: int) -> int:
    """Images per engine call: --batch-size, or fewer for a small job, so that every actor the cluster allows gets
    a call (12 images in calls of 8 would leave all but two CPUs idle)."""
    actors = actor_count(ray, requested_actors, images)
    return max(1, min(batch_size, -(-images // actors)))


READ_CHUNK_BYTES = 64 << 20  # a local folder's files held by the driver at once, on their way to the object store


def image_rows(ray, source: Location, names: list, per_call: int):
    """(a Ray Data dataset of rows {path, bytes}, one block per engine call so that the calls spread over the
    actors; the files that could not be read, as failures). A URI's files are read by the nodes; a local folder's by
    the driver, a chunk at a time, into Ray's object store, so that no other node needs the folder (Ray Data's
    `local://` paths, which did this on the head node, are deprecated)."""
    if not source.local:
        return ray.data.read_binary_files([source.join(n) for n in names], include_paths=True,
                                          filesystem=source.filesystem, num_cpus=0,
                                          override_num_blocks=-(-len(names) // per_call)), []
    parts, rows, size, failed = [], [], 0, []
    for name in names:
        try:
            data = source.read(name)
        except OSError as e:
            failed.append({"image": name, "error": f"'{name}' cannot be read: {e.strerror or e}",
                           "kind": InputError.kind})
            continue
        rows.append({"path": name, "bytes": data})
        size += len(data)
        if size >= READ_CHUNK_BYTES and len(rows) % per_call == 0:
            parts.append(ray.data.from_items(rows, override_num_blocks=len(rows) // per_call))
            rows, size = [], 0
    if rows:
        parts.append(ray.data.from_items(rows, override_num_blocks=-(-len(rows) // per_call)))
    if not parts:
        return None, failed
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), failed


def run_batch(bundle, input_dir, output_dir, options: ExplainOptions | None = None,
              targets: TargetChoice | None = None, *, backend: BackendOptions | None = None,
              limits: Limits = DEFAULT_LIMITS, address=None, actors=None, batch_size=8, retry_failed=False,
              runtime_env=None) -> dict:
    """Explains every image of `input_dir` into `output_dir`; `batch_size` images per engine call, `actors` at most.
    Everything is checked before Ray starts."""
    from igcam_engine.apps.cluster import check_address, check_workers_cache
    from igcam_engine.bundle import load_manifest

    check_address(address, "batch")
    check_workers_cache(address, runtime_env)
    batch_size = integer(batch_size, "batch_size", 1)
    actors = None if actors is None else integer(actors, "actors", 1)
    backend, limits = (backend or BackendOptions()).checked(), limits.checked()
    manifest = load_manifest(bundle)
    options = (options or ExplainOptions()).checked(limits, manifest.target_layer.channels)
    targets = (targets or TargetChoice()).checked(manifest, limits)
    # a record names what its maps were computed with: a rerun with other options, or another precision, redoes them
    record = {"explain": options.record(), "targets": targets.record(), "precision": backend.precision}
    source, output = Location.parse(input_dir), Location.parse(output_dir)
    todo, done, failed_before, unreadable = pending(source, output, record, retry_failed)
    summary = {"explained": 0, "already_done": len(done), "failed_before": failed_before,
               "failed": [{"image": name, "error": f"'{name}' cannot be read: a broken link or a link loop",
                           "kind": InputError.kind} for name in unreadable],
               "actors": 0, "nodes": {}, "output": output.shown}
    if todo or unreadable:
        output.create()
    if todo:
        _explain_on_ray(summary, todo, bundle, source, output, address, runtime_env, actors, batch_size,
                        {"options": options, "targets": targets, "record": record}, backend, limits)
    for failure in summary["failed"]:
        output.write(f"{PurePosixPath(failure['image']).stem}.failed.json",
                     (json.dumps({**failure, "options": record}, indent=2) + "\n").encode())
    if summary["failed"]:
        output.write("failures.json", (json.dumps(summary["failed"], indent=2) + "\n").encode())
    return summary


def _explain_on_ray(summary, todo, bundle, source, output, address, runtime_env, actors, batch_size, job, backend,
                    limits) -> None:
    """Explains `todo` with Ray Data's actors, writing each image's files as they come; counts into `summary`."""
    from igcam_engine.apps.cluster import ship_bundle, start_ray, stop_ray

    ray = start_ray(address, "scale", "batch", runtime_env)
    try:
        shipped = ship_bundle(ray, bundle)
        per_call = images_per_call(ray, actors, len(todo), batch_size)
        summary["actors"] = actor_count(ray, actors, -(-len(todo) // per_call))
        nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        print(f"igcam batch: {len(todo)} images, {summary['actors']} actors on a cluster of {len(nodes)} node(s) "
              f"({int(ray.cluster_resources().get('CPU', 0))} CPUs), {per_call} images per engine call", flush=True)
        # the command prints its own summary; Ray Data's progress reports would flood a log
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False
        dataset, unreadable = image_rows(ray, source, todo, per_call)
        summary["failed"].extend(unreadable)
        if dataset is None:
            return
        # Ray Data places its actors with its SPREAD strategy; a block per engine call, and one call in flight per
        # actor, let the calls spread too (with four in flight, the actor next to the blocks took a small job whole).
        dataset = dataset.map_batches(
            ExplainImages, fn_constructor_args=(shipped, output.shown, job, backend, limits),
            batch_size=per_call, num_cpus=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=summary["actors"], max_tasks_in_flight_per_actor=1))
        worked = Counter()
        for result in dataset.iter_rows():
            name = str(result["path"])
            if result["status"] == "ok":
                for file, data in pickle.loads(result["outputs"]):  # the record comes last
                    output.write(file, data)
                summary["explained"] += 1
                worked[str(result["node"])] += 1
            else:
                summary["failed"].append({"image": name, "error": str(result["message"]), "kind": str(result["kind"])})
        summary["nodes"] = {f"{nodes.get(node, '?')} ({node[:8]})": count for node, count in worked.items()}
    finally:
        stop_ray(ray)


def arguments(parser) -> None:
    from igcam_engine.apps.cluster import add_cluster_arguments

    parser.add_argument("bundle", help="bundle directory (from `igcam export`)")
    parser.add_argument("input", metavar="INPUT", help="folder of images (top level): a path, or a URI (s3://, gs://, "
                        "abfs://, hdfs://, file://)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="output folder: a path or a URI")
    add_cluster_arguments(parser, "")
    parser.add_argument("--actors", metavar="N", help="Explainer actors at most (default: one per CPU of the cluster)")
    parser.add_argument("--batch-size", default="8", metavar="N", help="images per engine call (default: 8)")
    parser.add_argument("--retry-failed", action="store_true", help="try again the images that failed before")
    add_target_arguments(parser)
    add_method_arguments(parser)
    add_backend_arguments(parser)
    add_limit_arguments(parser)


def run(args) -> int:
    import sys

    from igcam_engine.apps.cluster import parse_runtime_env

    summary = run_batch(args.bundle, args.input, args.output, explain_options(args), target_choice(args),
                        backend=backend_options(args), limits=limits(args), address=args.address,
                        actors=None if args.actors is None else integer_text(args.actors),
                        batch_size=integer_text(args.batch_size), retry_failed=args.retry_failed,
                        runtime_env=parse_runtime_env(args.runtime_env))
    print(f"{summary['explained']} explained, {summary['already_done']} already done, "
          f"{len(summary['failed'])} failed; outputs in {summary['output']}/")
    if summary["nodes"]:
        print("explained on " + ", ".join(f"{node}: {count}" for node, count in summary["nodes"].items()))
    if summary["failed_before"]:
        print(f"{len(summary['failed_before'])} image(s) failed in an earlier run and were skipped "
              "(--retry-failed tries them again)")
    for failure in summary["failed"]:
        print(f"failed: {failure['image']}: {failure['error']}", file=sys.stderr)
    if summary["failed"]:
        print(f"failures listed in {summary['output']}/failures.json", file=sys.stderr)
        return 1
    return 0


COMMANDS = (Command("batch", "explain every image of a folder with Ray Data (resumable)", arguments, run),)
