"""labelserve calling CVAT (cvat-sdk): connections, a task's frames (from its bucket when a storage profile
serves it, else through CVAT) and label checks (tasks.py), the CVAT parts of a job spec (spec.py), and the
AI-agent functions cvat-cli loads on their own (agent_functions.py, self-contained). CVAT calling labelserve
is HTTP: server/api/routes/nuclio.py and cvat.py."""
