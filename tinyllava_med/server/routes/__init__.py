"""HTTP routers, one per resource; each route is thin and calls `server.serving`."""
