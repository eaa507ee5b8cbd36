"""The service: FastAPI app, persistence, access control, listeners and the CLI."""
