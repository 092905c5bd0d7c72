"""HTTP only: routes translate requests into service calls and results into replies. Only server/app.py and
server/cli/ import this package."""
