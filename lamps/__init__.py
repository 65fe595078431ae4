"""The `lamps` command and what it runs locally: model preparation, Redis, Ray and Serve."""
