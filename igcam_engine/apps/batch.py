"""`igcam batch`: explain every image of a folder with Ray Data, on this machine or on a Ray cluster.

The images are read by Ray Data's binary-file reader (a local folder's on the machine where igcam runs, a URI's by
whichever node reads it); Ray actors, as many as the cluster has CPUs unless --actors says otherwise, each hold one
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
from pathlib import PurePosixPath

import numpy as np

from igcam_engine.apps.storage import Location
from igcam_engine.errors import UserError
from igcam_engine.images import MAX_PIXELS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
METHOD_OPTIONS = ("method", "integrate", "channels", "variant", "rule", "steps")  # the record's options explain() takes


class ExplainImages:
    """A Ray Data actor: the shipped bundle materialised on its node, one Explainer, one engine call per batch of
    images. It returns, per image, its status and the bytes of its output files (record last), which the driver
    writes where the output lives."""

    def __init__(self, shipped: list, output: str, options: dict, providers, max_pixels: int):
        """output: the output location as records name it (Location.shown); options: the method's and the
        precision's (OpenVINO's)."""
        import ray

        from igcam_engine import Explainer
        from igcam_engine.apps.cluster import materialise_bundle

        self.folder = materialise_bundle(shipped)
        self.explainer = Explainer(self.folder.name, providers=providers, precision=options["precision"])
        self.output, self.options, self.max_pixels = output, options, max_pixels
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        from igcam_engine.apps.outputs import render_explanation
        from igcam_engine.images import load_image, to_model_input

        names = [PurePosixPath(str(p)).name for p in batch["path"]]
        count = len(names)
        status, messages, outputs, loaded = ["ok"] * count, [""] * count, [b""] * count, []
        for index, data in enumerate(batch["bytes"]):
            try:
                picture = load_image(bytes(data), self.max_pixels)
                loaded.append((index, picture, *to_model_input(picture, self.explainer.input_shape,
                                                                 self.explainer.preprocess)))
            except UserError as e:
                status[index], messages[index] = "failed", str(e).replace("image bytes", "the file", 1)
        if loaded:
            images = np.stack([item[2] for item in loaded])
            try:
                scores = self.explainer.predict(images)
                target, top_k = self.options["target"], self.options["top_k"] or 1
                targets = (np.full((len(loaded), 1), target) if target is not None
                           else np.argsort(-scores, axis=1)[:, :top_k])
                maps = self.explainer.explain(images, targets, **{key: self.options[key] for key in METHOD_OPTIONS})
            except UserError as e:
                for index, *_ in loaded:
                    status[index], messages[index] = "failed", str(e)
                loaded = []
            for row, (index, picture, _, shown) in enumerate(loaded):
                stem = PurePosixPath(names[index]).stem
                entry, files = render_explanation(stem, picture, shown, maps[row], targets[row], scores[row],
                                                  self.explainer, self.output)
                record = {"image": names[index], "options": self.options, "node": self.node, **entry}
                files[f"{stem}.json"] = (json.dumps(record, indent=2) + "\n").encode()  # last: the image is done
                outputs[index] = pickle.dumps(list(files.items()))
        return {"path": np.array(names), "status": np.array(status), "message": np.array(messages),
                "node": np.array([self.node] * count), "outputs": np.array(outputs, dtype=object)}


def pending(source: Location, output: Location, options: dict, retry_failed: bool = False):
    """(images still to explain, images done, images that failed before): file names in the input folder (top
    level, by suffix). An image is done when its record exists in the output location and was made with the same
    options; otherwise it is explained again."""
    if source.kind() != "folder":
        raise UserError(f"input folder '{source.shown}' does not exist or is not a folder")
    if output.same_as(source):
        raise UserError(f"the output folder is the input folder '{source.shown}': the overlays written would be "
                        "explained on the next run; choose another output folder")
    images = sorted(name for name in source.files() if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES)
    stems = Counter(PurePosixPath(name).stem for name in images)
    duplicates = sorted(stem for stem, n in stems.items() if n > 1)
    if duplicates:
        raise UserError(f"several images share a name ({', '.join(duplicates)}): outputs are named by it; rename them")
    existing = output.files()
    done = [n for n in images if _recorded(output, existing, f"{PurePosixPath(n).stem}.json", options)]
    failed = [n for n in images if not retry_failed and n not in done
              and _recorded(output, existing, f"{PurePosixPath(n).stem}.failed.json", options)]
    return [n for n in images if n not in done and n not in failed], done, failed


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


def run_batch(bundle, input_dir, output_dir, *, address=None, actors=None, batch_size=8, steps=50, method="igcam",
              integrate=None, channels=None, variant="official", rule=None, target=None, top_k=None, providers=None,
              precision=None, retry_failed=False, max_pixels=MAX_PIXELS, runtime_env=None) -> dict:
    from igcam_engine.apps.cluster import check_address, ship_bundle, start_ray, stop_ray
    from igcam_engine.bundle import load_manifest
    from igcam_engine.explainer import check_backend, path_nodes
    from igcam_engine.methods import check_channels

    check_address(address, "batch")
    precision = check_backend(providers, precision)  # a record names what its maps were computed in
    manifest = load_manifest(bundle)
    row = path_nodes(method, variant, rule, steps, integrate=integrate)[0]  # one error, not one per file
    check_channels(channels, row, manifest["target_layer"]["shape"][0])
    if target is not None and not 0 <= target < manifest["num_classes"]:
        raise UserError(f"--target must be in [0, {manifest['num_classes'] - 1}], got {target}")
    options = {"method": method, "integrate": integrate, "channels": channels, "variant": variant, "rule": rule,
               "steps": steps, "target": target, "top_k": top_k, "precision": precision}
    source, output = Location.parse(input_dir), Location.parse(output_dir)
    todo, done, failed_before = pending(source, output, options, retry_failed)
    summary = {"explained": 0, "already_done": len(done), "failed_before": failed_before, "failed": [],
               "actors": 0, "nodes": {}, "output": output.shown}
    if not todo:
        return summary
    output.create()
    ray = start_ray(address, "scale", "batch", runtime_env)
    try:
        shipped = ship_bundle(ray, bundle)
        summary["actors"] = actor_count(ray, actors, -(-len(todo) // batch_size))
        nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
        print(f"igcam batch: {len(todo)} images, {summary['actors']} actors on a cluster of {len(nodes)} node(s) "
              f"({int(ray.cluster_resources().get('CPU', 0))} CPUs)", flush=True)
        # the command prints its own summary; Ray Data's progress reports would flood a log
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Reading takes no CPU slot, so that the actors may hold every one without starving the readers.
        dataset = ray.data.read_binary_files(source.reader_paths(todo), include_paths=True,
                                             filesystem=source.reader_filesystem(), num_cpus=0)
        dataset = dataset.map_batches(
            ExplainImages, fn_constructor_args=(shipped, output.shown, options, providers, max_pixels),
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=summary["actors"]), num_cpus=1,
            batch_format="numpy")
        worked = Counter()
        for record in dataset.iter_rows():
            name = str(record["path"])
            if record["status"] == "ok":
                for file, data in pickle.loads(record["outputs"]):  # the record comes last
                    output.write(file, data)
                summary["explained"] += 1
                worked[str(record["node"])] += 1
            else:
                summary["failed"].append({"image": name, "error": str(record["message"])})
        summary["nodes"] = {f"{nodes.get(node, '?')} ({node[:8]})": count for node, count in worked.items()}
    finally:
        stop_ray(ray)
    for failure in summary["failed"]:
        output.write(f"{PurePosixPath(failure['image']).stem}.failed.json",
                     (json.dumps({**failure, "options": options}, indent=2) + "\n").encode())
    if summary["failed"]:
        output.write("failures.json", (json.dumps(summary["failed"], indent=2) + "\n").encode())
    return summary
