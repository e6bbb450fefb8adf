"""Tests of the HTTP server: real images, real HTTP (TestClient, uvicorn, boto3)."""
