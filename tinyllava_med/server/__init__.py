"""The FastAPI server: app factory, routers, schemas, settings, auth, metrics, database and web client."""
