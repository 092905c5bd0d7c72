"""Batch pre-labeling jobs: a serialisable job spec, SQLite state, a threaded local engine, output writers
(CVAT for images 1.1, COCO, YOLO), the /v1/jobs routes and the `labelserve prelabel` command."""
