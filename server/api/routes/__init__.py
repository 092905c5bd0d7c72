"""One module per HTTP surface; server/api/routers.py lists them in the order they are included."""
