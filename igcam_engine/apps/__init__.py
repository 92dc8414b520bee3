"""The applications built on the runtime core, each importing the core and none importing another in a circle:

- cli: the `igcam` command (argument parsing, one-line errors); it dispatches to the others;
- explain: explain image files into overlays, raw maps and results.json (`igcam explain`), with outputs, the
  writer shared with batch;
- demo: pretrained EfficientNet-Lite0 on the sample photos (`igcam demo`);
- serve: the HTTP service on Ray Serve (`igcam serve`);
- batch: folders of images with Ray Data (`igcam batch`).
"""
