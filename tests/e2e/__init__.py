"""End-to-end tests against a real Label Studio server (marker `e2e`)."""
