"""Scale-out past one process (issue #15): labelserve's own app run in Ray Serve replicas, each request routed
by the image it names to the replica whose L1 holds that image's embedding. Ray is an optional extra
(`labelserve[ray]`); only ray_app.py imports it."""
