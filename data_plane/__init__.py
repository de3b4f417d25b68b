"""Store layout, ingest of slides and volumes, tissue detection, stain normalisation, streams, sample data."""
