"""The API tests' real server (FakeNode behind ``serve_api`` on 127.0.0.1) for the SDK's task and model tests."""

from tests.api.conftest import served  # noqa: F401 - a fixture, used by name
