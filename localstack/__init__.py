"""The local stack: real processes (Postgres, Redis, simulator, API, workers, Prometheus, Grafana) on this
machine, supervised like pods. Used by ``make serve``, ``make demo``, ``make bench`` and the tests."""
