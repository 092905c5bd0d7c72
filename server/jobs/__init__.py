"""Batch pre-labeling jobs: the job document (spec.py), SQLite state (store.py), and the threaded local
engine, one question per file: engine.py (the lifecycle), validate.py (is it acceptable?), status.py (how far
is it?), image_job.py and video_job.py (how do its items run?), outputs.py and cvat_upload.py (where do the
results go?). The /v1/jobs routes are server/api/routes/jobs.py; `labelserve prelabel` is
server/cli/prelabel.py."""
