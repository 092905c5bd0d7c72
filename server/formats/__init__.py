"""The one place a shape (models.shapes) becomes bytes: API JSON, CVAT's JSON, mask codecs, stored results and
dataset files. The one exception is server/cvat/agent_functions.py, which cvat-cli loads on its own and so
keeps its own `cvat_annotation`.
"""
