"""Job specs and backends (local, Slurm, Ray, Kubernetes). Imports no other tessera package: it launches them."""
