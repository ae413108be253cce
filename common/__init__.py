"""What the local demo and the cluster share: the stack-config schema, the Prometheus, Grafana and k6
configuration builders, the PromQL queries and the tool resolver. Imports only ``service`` below it."""
