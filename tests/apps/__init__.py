"""Small ASGI apps that the integration tests serve with a real uvicorn."""
